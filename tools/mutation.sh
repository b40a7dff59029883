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
#
# Sampled scoring, for modules whose full run does not fit in a time box:
#   MUTATION_SAMPLE=150 MUTATION_SEED=1 tools/mutation.sh outcomes
# generates every mutant of the module (a `mutmut run` whose name pattern matches nothing stops right
# after generation and the test-coverage stats), lists them (`mutmut results --all true`), draws N names
# with random.Random(seed).sample over the sorted names, runs only those (`mutmut run NAME...`; killed ones
# from an earlier run with the same source keep their result, the others are rerun) and prints the score on
# the sample with a 95% Wilson interval and the module's total number of mutants. Because the sample is a
# simple random draw from all the module's mutants, its score is an unbiased estimate of the score a full run
# would give, and the interval says how far off it can be; the same seed draws the same mutants, so a rerun
# after new tests shows their effect on the same sample. Mutants left unchecked by the time box are not in
# the score (the report counts them), which biases it only if the box cuts the sample short.
# Sampled mutants that no selected test reaches are counted as "no tests" (outside the score, as in a full
# run); the sample's survivors are listed by name.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BOX="${MUTATION_BOX:-600}"
BASE="${MUTATION_DIR:-${TMPDIR:-/tmp}/te-mutation}"
SAMPLE="${MUTATION_SAMPLE:-}"
SEED="${MUTATION_SEED:-0}"

# module (file under src/therapist_effects) -> the fast test files that check it
declare -A TESTS=(
    [csvsafe]="tests/test_report_units.py tests/test_mutation_kills.py"
    [classify]="tests/test_mutation_kills.py"
    [privacy]="tests/test_report_units.py tests/test_mutation_kills.py tests/test_surviving_mutants.py::test_funnel_leaves_out_a_therapist_whose_point_reveals_a_small_count"
    [meta]="tests/test_meta.py tests/test_mutation_kills.py tests/test_mutation_kills_meta.py tests/test_surviving_mutants.py::test_paule_mandel_i2_by_hand tests/test_meta_metafor.py::test_pool_matches_metafor tests/test_meta_metafor.py::test_leave_one_out_matches_metafor tests/test_meta_metafor.py::test_reference_sets_cover_truncation_and_knha tests/test_meta_metafor.py::test_knapp_hartung_by_hand tests/test_meta_metafor.py::test_donner_unbalanced_n0_by_hand tests/test_meta_metafor.py::test_study_table_column_mapping_and_inputs tests/test_meta_metafor.py::test_study_table_errors_name_file_row_and_column tests/test_meta_metafor.py::test_arm_table_pooled_ratio_on_the_log_scale_by_hand"
    [instruments]="tests/test_instruments.py tests/test_mutation_kills.py tests/test_mutation_kills_instruments.py"
    [outcomes]="tests/test_outcomes.py tests/test_mutation_kills.py tests/test_mutation_kills_outcomes.py tests/test_scores.py::test_patient_table_has_per_instrument_columns_and_paired_outcomes"
    [profile]="tests/test_mutation_kills_reml.py tests/test_reml_reference.py tests/test_surviving_mutants.py::test_icc_profile_ends_match_the_closed_form_reml_profile tests/test_surviving_mutants.py::test_profile_lower_end_is_exactly_zero_for_a_weak_interior_estimate tests/test_surviving_mutants.py::test_near_boundary_fit_is_not_singular_and_matches_anova"
    [reml]="tests/test_mutation_kills_reml.py tests/test_reml_reference.py tests/test_surviving_mutants.py::test_parametric_bootstrap_reproduces_the_anova_sampling_distribution tests/test_surviving_mutants.py::test_icc_profile_ends_match_the_closed_form_reml_profile tests/test_surviving_mutants.py::test_random_intercept_lrt_p_value_is_half_the_chi2_tail_dyestuff tests/test_surviving_mutants.py::test_near_boundary_fit_is_not_singular_and_matches_anova tests/test_surviving_mutants.py::test_profile_lower_end_is_exactly_zero_for_a_weak_interior_estimate"
    [arm]="tests/test_mutation_kills_arm.py tests/test_arm_reference.py::test_reml_estimates_match_lme4 tests/test_arm_reference.py::test_reml_estimates_match_glmmTMB tests/test_arm_reference.py::test_contract_entry tests/test_arm_reference.py::test_string_arm_labels_and_feedback_level tests/test_arm_reference.py::test_singular_fit_warns_and_flags tests/test_arm_reference.py::test_cluster_level_criterion_equals_dense_computation tests/test_arm_reference.py::test_control_arm_singular_makes_ratio_undefined tests/test_arm_reference.py::test_lrt_equal_variances_against_statsmodels tests/test_surviving_mutants.py::test_arm_equal_variance_lrt_p_is_the_full_chi2_tail"
    [arm_inference]="tests/test_mutation_kills_arm.py tests/test_arm_inference.py tests/test_arm_reference.py::test_profile_intervals_match_lme4 tests/test_arm_reference.py::test_exact_profile_limits_are_likelihood_ratio_roots tests/test_arm_reference.py::test_backspline_reproduces_r_on_a_known_function tests/test_arm_reference.py::test_bootstrap_is_seeded_and_close_to_profile tests/test_arm_reference.py::test_lrt_equal_variances_against_statsmodels tests/test_surviving_mutants.py::test_arm_equal_variance_lrt_p_is_the_full_chi2_tail"
    [gaussian]="tests/test_mutation_kills_engine.py tests/test_engine_blocks.py tests/test_slope_derivatives.py tests/test_reml_reference.py"
    [derivatives]="tests/test_mutation_kills_engine.py tests/test_slope_derivatives.py tests/test_engine_blocks.py"
    [glmm]="tests/test_glmm_reference.py tests/test_mutation_kills_glmm.py"
    [inference]="tests/test_mutation_kills_inference.py tests/test_results_interface.py::test_one_bootstrap_seed_rule_and_failure_count"
)
declare -A FILE=(
    [csvsafe]="io/csvsafe.py" [classify]="classify.py" [privacy]="report/privacy.py" [meta]="meta.py"
    [instruments]="io/instruments.py" [outcomes]="io/outcomes.py" [profile]="models/profile.py" [reml]="models/reml.py"
    [arm]="models/arm.py" [glmm]="models/glmm.py" [inference]="engine/inference.py"
    [arm_inference]="models/arm_inference.py" [gaussian]="engine/gaussian.py" [derivatives]="engine/derivatives.py"
)
ORDER=(csvsafe classify privacy meta instruments outcomes gaussian derivatives profile reml arm arm_inference glmm
       inference)
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
    echo "== mutmut: ${FILE[$m]} against ${TESTS[$m]} (time box: ${BOX}s${SAMPLE:+; sample $SAMPLE, seed $SEED})"
    start=$(date +%s)
    names=()
    if [ -n "$SAMPLE" ]; then
        # generate the mutants and the stats only: this pattern matches no mutant, so mutmut stops there
        (cd "$dir" && PYTHONPATH= nice -n 10 python3 -m mutmut run --max-children 1 "no-such-mutant" >"$dir/generate.log" 2>&1) ||
            grep -q "nothing matches" "$dir/generate.log" || { cat "$dir/generate.log" >&2; exit 1; }
        (cd "$dir" && python3 - "$SAMPLE" "$SEED" <<'PY'
import json, random, subprocess, sys
n, seed = int(sys.argv[1]), int(sys.argv[2])
out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], capture_output=True, text=True).stdout
status = dict(l.strip().rsplit(": ", 1) for l in out.splitlines() if "__mutmut_" in l)
sample = random.Random(seed).sample(sorted(status), min(n, len(status)))
tests = json.load(open("mutants/mutmut-stats.json"))["tests_by_mangled_function_name"]
open("sample.txt", "w").write("".join(f"{name}\n" for name in sample))
# killed mutants keep their result; mutants no selected test reaches are "no tests" without a run
run = [name for name in sample if status[name] not in ("killed", "timeout") and tests.get(name.partition("__mutmut_")[0])]
open("sample_run.txt", "w").write("".join(f"{name}\n" for name in run))
PY
        )
        mapfile -t names <"$dir/sample_run.txt"
    fi
    set +e
    if [ -n "$SAMPLE" ] && [ ${#names[@]} -eq 0 ]; then
        :
    elif [ "$BOX" -gt 0 ]; then
        (cd "$dir" && PYTHONPATH= timeout --signal=INT "$BOX" nice -n 10 python3 -m mutmut run --max-children 1 "${names[@]}" >"$dir/run.log" 2>&1)
    else
        (cd "$dir" && PYTHONPATH= nice -n 10 python3 -m mutmut run --max-children 1 "${names[@]}" >"$dir/run.log" 2>&1)
    fi
    set -e
    secs=$(( $(date +%s) - start ))
    line=$(cd "$dir" && python3 - "$m" "$secs" "${SAMPLE:+sample.txt}" <<'PY'
import collections, json, math, subprocess, sys
m, secs, sample_file = sys.argv[1], sys.argv[2], sys.argv[3]
out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], capture_output=True, text=True).stdout
status = dict(l.strip().rsplit(": ", 1) for l in out.splitlines() if "__mutmut_" in l)
total = len(status)
if sample_file:
    tests = json.load(open("mutants/mutmut-stats.json"))["tests_by_mangled_function_name"]
    names = open(sample_file).read().split()
    # a sampled mutant that no selected test reaches was not run by mutmut: report it as "no tests"
    status = {n: status[n] if status[n] != "not checked" or tests.get(n.partition("__mutmut_")[0]) else "no tests"
              for n in names}
c = collections.Counter(status.values())
killed = c["killed"] + c["timeout"]
tested = killed + c["survived"] + c["suspicious"]
score = f"{100 * killed / tested:.1f}%" if tested else "n/a"
if sample_file and tested:
    # Wilson score interval, 95%
    z, p = 1.959964, killed / tested
    centre = (p + z * z / (2 * tested)) / (1 + z * z / tested)
    half = z / (1 + z * z / tested) * math.sqrt(p * (1 - p) / tested + z * z / (4 * tested * tested))
    score += f" [95% CI {100 * (centre - half):.1f}-{100 * (centre + half):.1f}%]"
rest = ", ".join(f"{k} {v}" for k, v in sorted(c.items()) if k not in ("killed", "timeout", "survived", "suspicious"))
drawn = f"  sample {len(status):>4}" if sample_file else ""
print(f"{m:<12} mutants {total:>5}{drawn}  tested {tested:>5}  killed {killed:>5}  survived {c['survived']:>4}"
      f"  score {score:>6}  ({secs}s{'; ' + rest if rest else ''})")
if sample_file:
    print("\n".join(f"    survived: {n}" for n, s in sorted(status.items()) if s in ("survived", "suspicious")))
PY
)
    echo "$line"
    summary+=("${line%%$'\n'*}")
done
echo "== mutation score per module"
printf '%s\n' "${summary[@]}"
