#!/usr/bin/env bash
# Mutation testing (mutmut 3) of the modules where a wrong number does harm, one module at a time,
# against the fast tests that cover it; prints the mutation score per module.
#
#   python3 -m pip install -e ".[mutation]"
#   tools/mutation.sh                       # every module below, each time-boxed (MUTATION_BOX seconds)
#   tools/mutation.sh meta csvsafe          # only these modules
#   MUTATION_BOX=0 tools/mutation.sh reml   # no time box (hours for the big engines)
#
# Each module is mutated in a scratch copy of src/ and tests/ (MUTATION_DIR, default
# ${TMPDIR:-/tmp}/te-mutation/<module>), so the working tree is never touched. mutmut runs the tests
# once to learn which tests call which function, then each mutant against those tests only, one at a
# time (--max-children 1) under `nice`, in a process forked from a server that has only collected the
# tests (process_isolation = "forkserver"): with mutmut's default ("fork") each mutant inherits the
# stats run's module-level caches (fits cached by a test module) and survives unseen. A time box
# stops a module early: the report then says how many mutants were tested; rerunning the same command
# continues where it stopped (mutmut keeps results).
# Per module it prints: mutants, tested, killed (incl. timeouts), survived, score = killed / tested;
# `cd $MUTATION_DIR/<module> && mutmut results` lists the survivors, `mutmut show <name>` the diff.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BOX="${MUTATION_BOX:-600}"
BASE="${MUTATION_DIR:-${TMPDIR:-/tmp}/te-mutation}"

# module (file under src/therapist_effects) -> the fast test files that check it
declare -A TESTS=(
    [csvsafe]="tests/test_report_units.py tests/test_mutation_kills.py"
    [classify]="tests/test_mutation_kills.py"
    [privacy]="tests/test_report_units.py tests/test_mutation_kills.py tests/test_surviving_mutants.py::test_funnel_leaves_out_a_therapist_whose_point_reveals_a_small_count"
    [meta]="tests/test_meta.py tests/test_mutation_kills.py tests/test_surviving_mutants.py::test_paule_mandel_i2_by_hand"
    [instruments]="tests/test_instruments.py tests/test_mutation_kills.py"
    [outcomes]="tests/test_outcomes.py tests/test_mutation_kills.py"
    [profile]="tests/test_reml_reference.py tests/test_surviving_mutants.py::test_icc_profile_ends_match_the_closed_form_reml_profile tests/test_surviving_mutants.py::test_profile_lower_end_is_exactly_zero_for_a_weak_interior_estimate tests/test_surviving_mutants.py::test_near_boundary_fit_is_not_singular_and_matches_anova"
    [reml]="tests/test_reml_reference.py tests/test_surviving_mutants.py::test_parametric_bootstrap_reproduces_the_anova_sampling_distribution tests/test_surviving_mutants.py::test_icc_profile_ends_match_the_closed_form_reml_profile tests/test_surviving_mutants.py::test_random_intercept_lrt_p_value_is_half_the_chi2_tail_dyestuff tests/test_surviving_mutants.py::test_near_boundary_fit_is_not_singular_and_matches_anova tests/test_surviving_mutants.py::test_profile_lower_end_is_exactly_zero_for_a_weak_interior_estimate"
    [arm]="tests/test_arm_reference.py tests/test_surviving_mutants.py::test_arm_equal_variance_lrt_p_is_the_full_chi2_tail"
    [glmm]="tests/test_glmm_reference.py tests/test_mutation_kills_glmm.py"
    [inference]="tests/test_mutation_kills_inference.py tests/test_results_interface.py::test_one_bootstrap_seed_rule_and_failure_count"
)
declare -A FILE=(
    [csvsafe]="csvsafe.py" [classify]="classify.py" [privacy]="report/privacy.py" [meta]="meta.py"
    [instruments]="instruments.py" [outcomes]="outcomes.py" [profile]="profile.py" [reml]="reml.py"
    [arm]="arm.py" [glmm]="glmm.py" [inference]="engine/inference.py"
)
ORDER=(csvsafe classify privacy meta instruments outcomes profile reml arm glmm inference)
MODULES=("$@")
[ ${#MODULES[@]} -eq 0 ] && MODULES=("${ORDER[@]}")

summary=()
for m in "${MODULES[@]}"; do
    [ -n "${FILE[$m]:-}" ] || { echo "unknown module $m (one of: ${ORDER[*]})" >&2; exit 2; }
    dir="$BASE/$m"
    mkdir -p "$dir"
    rm -rf "$dir/src" "$dir/tests"
    cp -r "$ROOT/src" "$ROOT/tests" "$dir/"
    tests_toml=$(printf '"%s", ' ${TESTS[$m]})
    cat > "$dir/pyproject.toml" <<TOML
[tool.pytest.ini_options]
testpaths = ["tests"]
markers = ["slow: long simulation studies", "browser: headless Chromium"]

[tool.mutmut]
source_paths = ["src/"]
only_mutate = ["*therapist_effects/${FILE[$m]}"]
pytest_add_cli_args_test_selection = [${tests_toml%, }]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-n", "0", "-x", "-q"]
process_isolation = "forkserver"
TOML
    echo "== mutmut: ${FILE[$m]} against ${TESTS[$m]} (time box: ${BOX}s)"
    start=$(date +%s)
    set +e
    if [ "$BOX" -gt 0 ]; then
        (cd "$dir" && PYTHONPATH= timeout --signal=INT "$BOX" nice -n 10 python3 -m mutmut run --max-children 1 >"$dir/run.log" 2>&1)
    else
        (cd "$dir" && PYTHONPATH= nice -n 10 python3 -m mutmut run --max-children 1 >"$dir/run.log" 2>&1)
    fi
    set -e
    secs=$(( $(date +%s) - start ))
    line=$(cd "$dir" && python3 - "$m" "$secs" <<'PY'
import subprocess, sys, collections
m, secs = sys.argv[1], sys.argv[2]
out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], capture_output=True, text=True).stdout
c = collections.Counter(l.rsplit(":", 1)[1].strip() for l in out.splitlines() if "__mutmut_" in l and ":" in l)
total = sum(c.values())
killed = c["killed"] + c["timeout"]
tested = killed + c["survived"] + c["suspicious"]
score = f"{100 * killed / tested:.1f}%" if tested else "n/a"
rest = ", ".join(f"{k} {v}" for k, v in sorted(c.items()) if k not in ("killed", "timeout", "survived", "suspicious"))
print(f"{m:<12} mutants {total:>5}  tested {tested:>5}  killed {killed:>5}  survived {c['survived']:>4}"
      f"  score {score:>6}  ({secs}s{'; ' + rest if rest else ''})")
PY
)
    echo "$line"
    summary+=("$line")
done
echo "== mutation score per module"
printf '%s\n' "${summary[@]}"
