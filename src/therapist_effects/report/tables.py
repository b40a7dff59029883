"""Publication tables: ``results/<dataset>/tables/`` (Markdown, LaTeX, CSV) and a participant-flow SVG.

``models.md`` / ``models.tex`` / ``models.csv``: one row block per model, with the fixed effects (SE and
95% CI), the variance components (with CI), the ICC (per arm, ratio and reduction for arm models) with
its CI, logLik / AIC / BIC and the numbers of patients and therapists; the notes under the table give
each model's estimation method and interval methods.

``descriptives.md`` / ``.tex`` / ``.csv``: the descriptive table by arm (as in the research report).
``flow.svg``: the participant flow from the row accounting (rows read, rejected by reason, used;
patients and therapists; patients analysed per model).

Rounding follows APA style (Publication Manual, 7th ed., 6.36): two decimals; three for magnitudes below
0.1 (where two would hide the value; a value below 0.001 is written with two significant digits);
statistics that cannot exceed 1 (ICCs, p-values) without a leading zero, ICCs to three decimals;
p-values to three decimals, ``< .001`` below; counts with thousands separators; a minus sign, not a
hyphen. The CSV holds the same rows with the values rounded as displayed (numbers, not text).
"""

from __future__ import annotations

import math
from html import escape as _xml_escape
from pathlib import Path
from typing import Any

import pandas as pd

from ..models.comparison import information_criteria, n_params_of
from .fmt import _finite

__all__ = ["apa", "models_table", "descriptives_table", "flow_svg", "write_tables"]

MINUS = "\u2212"
DASH = "\u2014"
CI_NAMES = {"profile": "profile-likelihood", "wald": "Wald", "bootstrap": "parametric bootstrap (percentile)",
            "hdi": "highest posterior density", "eti": "equal-tailed posterior"}
METHOD_NAMES = {"reml": "restricted maximum likelihood (REML)", "ml": "maximum likelihood (ML)",
                "laplace": "maximum likelihood, Laplace approximation",
                "bayes": "Bayesian (PyMC, NUTS; posterior medians)",
                "bayes-grid": "Bayesian (exact grid posterior, independent draws; posterior medians)"}


def _decimals(v: float, kind: str) -> int:
    if kind in ("icc", "p"):
        return 3
    a = abs(v)
    if a == 0 or a >= 0.1:
        return 2
    if a >= 0.001:
        return 3
    return min(8, 1 - math.floor(math.log10(a)))


def apa_round(x: Any, kind: str = "num") -> float | None:
    """``x`` rounded as :func:`apa` displays it (None for missing or infinite values)."""
    v = _finite(x)
    if v is None:
        return None
    if kind == "count":
        return float(round(v))
    return round(v, _decimals(v, kind))


def apa(x: Any, kind: str = "num") -> str:
    """One number in APA style. ``kind``: ``num`` (estimates, SE, variances, fit indices), ``icc``
    (bounded by 1: three decimals, no leading zero), ``p`` (p-value), ``count``."""
    try:
        if x is not None and math.isinf(float(x)):
            return "\u221e" if float(x) > 0 else MINUS + "\u221e"
    except (TypeError, ValueError):
        pass
    v = _finite(x)
    if v is None:
        return DASH
    if kind == "count":
        return f"{int(round(v)):,}"
    if kind == "p":
        if v < 0.001:
            return "< .001"
        return f"{v:.3f}".lstrip("0") if v < 1 else "1.000"
    d = _decimals(v, kind)
    s = f"{v:,.{d}f}"
    if float(s.replace(",", "")) == 0:
        s = s.lstrip("-")
    if kind == "icc" and abs(v) < 1:
        s = s.replace("0.", ".", 1)
    return s.replace("-", MINUS)


def _ci(lo: Any, hi: Any, kind: str = "num", unbounded: bool = False) -> str:
    """``[low, high]``; with ``unbounded`` a missing end next to a finite one is infinite (a profile
    interval of a ratio whose denominator may be 0)."""
    if _finite(lo) is None and _finite(hi) is None:
        return ""
    if unbounded:
        lo = float("-inf") if _finite(lo) is None else lo
        hi = float("inf") if _finite(hi) is None else hi
    return f"[{apa(lo, kind)}, {apa(hi, kind)}]"


def _arm_name(e: dict, arm: str) -> str:
    role = {str(e.get("feedback_level")): "feedback", str(e.get("control_level")): "control"}.get(str(arm))
    return f"{role} ({arm})" if role else f"arm {arm}"


def _vc_name(e: dict, name: str) -> str:
    if name.startswith("therapist[") and name.endswith("]"):
        return f"Therapist, {_arm_name(e, name[10:-1])}"
    if name.startswith("residual[") and name.endswith("]"):
        return f"Residual, {_arm_name(e, name[9:-1])}"
    words = {"therapist": "Therapist", "residual": "Residual", "cluster": "Cluster (service)",
             "therapist_slope": "Therapist slope", "patient": "Patient", "patient_slope": "Patient slope"}
    return words.get(name, name)


def _method(e: dict) -> str:
    m = str(e.get("method", ""))
    low = m.lower()
    if low == "bayes" and e.get("sampler") == "grid":
        return METHOD_NAMES["bayes-grid"]
    if low.startswith("agq"):
        k = low[3:]
        return f"maximum likelihood, adaptive Gauss{chr(8211)}Hermite quadrature" + (f" ({k} nodes)" if k else "")
    return METHOD_NAMES.get(low, m or "unstated")


def model_rows(mid: str, e: dict) -> list[dict]:
    """The rows of one model's block: dicts with section, term, estimate, se, ci_low, ci_high, kind."""
    rows: list[dict] = []

    def add(section, term, est=None, se=None, lo=None, hi=None, kind="num"):
        rows.append({"model": mid, "section": section, "term": term, "estimate": est, "se": se,
                     "ci_low": lo, "ci_high": hi, "kind": kind})

    binom = e.get("family") == "binomial"
    fe_title = "Fixed effects (log-odds)" if binom else "Fixed effects"
    for name, v in (e.get("fixed_effects") or {}).items():
        v = v if isinstance(v, dict) else {"estimate": v}
        add(fe_title, name, v.get("estimate"), v.get("se"), v.get("ci_low"), v.get("ci_high"))
    vc_title = "Variance components (latent scale)" if binom else "Variance components"
    for name, v in (e.get("variance_components") or {}).items():
        v = v if isinstance(v, dict) else {"estimate": v}
        term = _vc_name(e, name) + (" (\u03c0\u00b2/3, fixed)" if binom and name.startswith("residual") else "")
        add(vc_title, term, v.get("estimate"), None, v.get("ci_low"), v.get("ci_high"))
    if isinstance(e.get("correlation"), dict):
        c = e["correlation"]
        add(vc_title, "Correlation", c.get("estimate"), None, c.get("ci_low"), c.get("ci_high"), "icc")
    icc_title = "Intraclass correlation (latent scale)" if binom else "Intraclass correlation"
    if isinstance(e.get("icc"), dict):
        i = e["icc"]
        add(icc_title, "ICC (therapist)", i.get("estimate"), None, i.get("ci_low"), i.get("ci_high"), "icc")
    if isinstance(e.get("icc_cluster"), dict):
        i = e["icc_cluster"]
        add(icc_title, "ICC (cluster)", i.get("estimate"), None, i.get("ci_low"), i.get("ci_high"), "icc")
    for arm, i in (e.get("icc_by_arm") or {}).items():
        add(icc_title, f"ICC, {_arm_name(e, arm)}", i.get("estimate"), None, i.get("ci_low"), i.get("ci_high"), "icc")
    if isinstance(e.get("icc_ratio"), dict):
        i = e["icc_ratio"]
        add(icc_title, "ICC ratio (feedback / control)", i.get("estimate"), None, i.get("ci_low"), i.get("ci_high"),
            "ratio")
    if isinstance(e.get("icc_reduction"), dict):
        i = e["icc_reduction"]
        add(icc_title, "ICC reduction (1 \u2212 ratio)", i.get("estimate"), None, i.get("ci_low"), i.get("ci_high"),
            "ratio")
    if e.get("loglik") is not None:
        crit = "REML" if str(e.get("method", "")).upper() == "REML" else "ML"
        add("Model fit", f"Log-likelihood ({crit})", e["loglik"])
        aic, bic = e.get("aic"), e.get("bic")
        k = n_params_of(e)
        if (aic is None or bic is None) and k is not None and e.get("n_patients"):
            ic = information_criteria(e["loglik"], k, int(e["n_patients"]))
            aic, bic = ic["aic"], ic["bic"]
        if aic is not None:
            add("Model fit", "AIC", aic)
            add("Model fit", "BIC", bic)
    add("Sample", "Patients", e.get("n_patients"), kind="count")
    add("Sample", "Therapists", e.get("n_therapists"), kind="count")
    if e.get("n_clusters"):
        add("Sample", "Clusters", e.get("n_clusters"), kind="count")
    return rows


def model_note(mid: str, e: dict) -> str:
    """One sentence per model: estimation and interval methods, and flags."""
    ci = None
    for key in ("icc", "icc_ratio", "correlation"):
        if isinstance(e.get(key), dict) and e[key].get("ci_method"):
            ci = e[key]["ci_method"]
            break
    if ci is None and e.get("icc_by_arm"):
        ci = next(iter(e["icc_by_arm"].values())).get("ci_method")
    bayes = str(e.get("method", "")).lower() == "bayes"
    fe_ci = "95% credible intervals" if bayes else "Wald 95% CIs"
    s = (f"Model {mid}: {e.get('formula') or e.get('outcome', '')}; estimated by {_method(e)}; fixed effects with "
         f"{fe_ci}; variance components and ICCs with {CI_NAMES.get(str(ci), str(ci or 'unstated'))} 95% "
         f"{'credible' if bayes else 'confidence'} intervals.")
    if e.get("family") == "binomial":
        s += " ICCs on the latent scale (residual variance \u03c0\u00b2/3)."
    if e.get("singular"):
        s += " Singular fit: a variance component is estimated at 0."
    if e.get("converged") is False:
        s += " WARNING: the fit did not converge."
    return s


def models_table(est: dict) -> tuple[pd.DataFrame, list[str]]:
    """All models' rows (config order) and the notes."""
    rows, notes = [], []
    for mid, e in (est.get("models") or {}).items():
        rows += model_rows(mid, e)
        notes.append(model_note(mid, e))
    notes.append("AIC and BIC as lme4's AIC()/BIC(): from the model's own (REML or ML) log-likelihood; "
                 "REML criteria of models with different fixed effects are not comparable.")
    if any(r["kind"] == "ratio" and (r["ci_low"] is None) != (r["ci_high"] is None) for r in rows):
        notes.append("An infinite interval end of the ICC ratio: the control-arm ICC may be 0.")
    return pd.DataFrame(rows, columns=["model", "section", "term", "estimate", "se", "ci_low", "ci_high", "kind"]), notes


# ------------------------------------------------------------------------------------------ renderers
def _md_cell(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                MINUS: "$-$", "\u03c0": r"$\pi$", "\u00b2": r"$^2$", "\u221e": r"$\infty$", DASH: "---",
                "\u2013": "--", "<": r"$<$", ">": r"$>$", "|": r"$|$"}


def tex_escape(text: str) -> str:
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in str(text))


def _cells(r: dict) -> list[str]:
    kind = r["kind"]
    return [apa(r["estimate"], kind), apa(r["se"]) if _finite(r["se"]) is not None else "",
            _ci(r["ci_low"], r["ci_high"], "icc" if kind == "icc" else "num", unbounded=kind == "ratio")]


def _blocks(df: pd.DataFrame):
    for mid, block in df.groupby("model", sort=False):
        yield mid, block


def render_markdown(df: pd.DataFrame, notes: list[str], est: dict) -> str:
    lines = [f"Table 1. Therapist-effect models, dataset {_md_cell(est.get('dataset', ''))}", "",
             "| Term | Estimate | SE | 95% CI |", "| :--- | ---: | ---: | :--- |"]
    for mid, block in _blocks(df):
        e = est["models"][mid]
        lines.append(f"| **Model {_md_cell(mid)}**: {_md_cell(e.get('outcome', ''))} | | | |")
        section = None
        for r in block.to_dict("records"):
            if r["section"] != section:
                section = r["section"]
                lines.append(f"| *{_md_cell(section)}* | | | |")
            est_s, se_s, ci_s = _cells(r)
            lines.append(f"| {_md_cell(r['term'])} | {est_s} | {se_s} | {ci_s} |")
    lines += ["", "*Note.* " + " ".join(_md_cell(n) for n in notes), ""]
    return "\n".join(lines)


def render_latex(df: pd.DataFrame, notes: list[str], est: dict) -> str:
    """A ``table`` environment (needs ``booktabs``) with the notes below it."""
    lines = [r"% needs \usepackage{booktabs}", r"\begin{table}[htbp]", r"\centering",
             r"\caption{Therapist-effect models, dataset " + tex_escape(est.get("dataset", "")) + "}",
             r"\begin{tabular}{lrrl}", r"\toprule", r"Term & Estimate & SE & 95\% CI \\", r"\midrule"]
    first = True
    for mid, block in _blocks(df):
        e = est["models"][mid]
        if not first:
            lines.append(r"\midrule")
        first = False
        lines.append(r"\multicolumn{4}{l}{\textbf{Model " + tex_escape(mid) + "}: "
                     + tex_escape(e.get("outcome", "")) + r"} \\")
        section = None
        for r in block.to_dict("records"):
            if r["section"] != section:
                section = r["section"]
                lines.append(r"\multicolumn{4}{l}{\textit{" + tex_escape(section) + r"}} \\")
            cells = [tex_escape(c) for c in _cells(r)]
            lines.append(r"\quad " + tex_escape(r["term"]) + " & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\par\smallskip",
              r"\begin{minipage}{\linewidth}\footnotesize\textit{Note.} "
              + " ".join(tex_escape(n) for n in notes) + r"\end{minipage}", r"\end{table}", ""]
    return "\n".join(lines)


def csv_frame(df: pd.DataFrame) -> pd.DataFrame:
    out = df.copy()
    for col in ("estimate", "se", "ci_low", "ci_high"):
        out[col] = [apa_round(v, "icc" if k == "icc" and col != "se" else ("count" if k == "count" else "num"))
                    for v, k in zip(out[col], out["kind"], strict=True)]
    return out.drop(columns=["kind"])


# ------------------------------------------------------------------------------------------ descriptives
def descriptives_table(patients: pd.DataFrame) -> pd.DataFrame | None:
    """Descriptive table by arm (rows: variables; columns: arms and all patients), cells as text."""
    from .research import descriptives

    d = descriptives(patients)
    if d is None:
        return None
    out = []
    for row in d["rows"]:
        cells = []
        for c in row["cells"]:
            if row["kind"] == "count":
                cells.append(apa(c, "count"))
            elif row["kind"] == "meansd":
                m, sd, _n = c
                cells.append(f"{apa(m)} ({apa(sd)})")
            else:
                k, n = c
                cells.append(f"{100 * k / n:.1f} ({int(k):,} of {n:,})" if n else DASH)
        out.append([row["label"], *cells])
    return pd.DataFrame(out, columns=["Variable", *d["columns"]])


def render_simple_markdown(df: pd.DataFrame, title: str) -> str:
    lines = [title, "", "| " + " | ".join(_md_cell(c) for c in df.columns) + " |",
             "| :--- |" + " ---: |" * (len(df.columns) - 1)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_md_cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def render_simple_latex(df: pd.DataFrame, title: str) -> str:
    cols = "l" + "r" * (len(df.columns) - 1)
    lines = [r"% needs \usepackage{booktabs}", r"\begin{table}[htbp]", r"\centering",
             r"\caption{" + tex_escape(title) + "}", r"\begin{tabular}{" + cols + "}", r"\toprule",
             " & ".join(tex_escape(c) for c in df.columns) + r" \\", r"\midrule"]
    for row in df.itertuples(index=False):
        lines.append(" & ".join(tex_escape(v) for v in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ flow diagram
def flow_svg(est: dict) -> str:
    """Participant flow (CONSORT-style boxes) from the row accounting of ``estimates.json``."""
    read, rejected, used = est.get("rows_read"), est.get("rows_rejected"), est.get("rows_used")
    if used is None and read is not None and rejected is not None:
        used = int(read) - int(rejected)
    reasons = sorted((est.get("rejected_by_reason") or {}).items(), key=lambda kv: (-int(kv[1]), kv[0]))
    n_pat, n_ther = est.get("n_patients"), est.get("n_therapists")
    cl = est.get("n_clusters")
    W, bw, x0 = 760, 330, 20
    boxes: list[tuple[float, float, float, float, list[str]]] = []
    arrows: list[tuple[float, float, float, float]] = []
    y = 20.0

    def box(x, y, w, lines):
        h = 14 + 17 * len(lines)
        boxes.append((x, y, w, h, lines))
        return h

    h1 = box(x0, y, bw, [f"Rows read: {apa(read, 'count')}"])
    yr = y + h1 + 25
    reason_lines = [f"Rows rejected: {apa(rejected, 'count')}"] + [f"  {r}: {apa(n, 'count')}" for r, n in reasons]
    hr = box(x0 + bw + 60, yr, W - (x0 + bw + 60) - 20, reason_lines)
    arrows.append((x0 + bw / 2, yr + 10, x0 + bw + 60, yr + 10))  # side arrow to the rejects
    y2 = yr + max(hr, 30) + 25
    arrows.append((x0 + bw / 2, y + h1, x0 + bw / 2, y2))
    patients_line = f"Patients: {apa(n_pat, 'count')}; therapists: {apa(n_ther, 'count')}" + (
        f"; clusters: {apa(cl, 'count')}" if cl else "")
    h2 = box(x0, y2, bw, [f"Rows used: {apa(used, 'count')}", patients_line])
    y3 = y2 + h2 + 30
    models = est.get("models") or {}
    for i, (mid, e) in enumerate(models.items()):
        excl = e.get("n_excluded") or 0
        why = "; ".join(f"{r}: {apa(n, 'count')}" for r, n in sorted((e.get("excluded_by_reason") or {}).items()))
        lines = [f"Model {mid}: {apa(e.get('n_patients'), 'count')} patients analysed",
                 f"{apa(e.get('n_therapists'), 'count')} therapists; patients excluded: {apa(excl, 'count')}"
                 + (f" ({why})" if why else "")]
        if i == 0:
            arrows.append((x0 + bw / 2, y2 + h2, x0 + bw / 2, y3))
        y3 += box(x0 + 20, y3, W - x0 - 40, lines) + 10
    H = int(y3 + 10)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           'font-family="Helvetica, Arial, sans-serif" font-size="13" role="img" aria-labelledby="flow-title">',
           f'<title id="flow-title">Participant flow, dataset {_xml_escape(str(est.get("dataset", "")))}</title>',
           '<defs><marker id="arrow" markerWidth="8" markerHeight="8" refX="7" refY="4" orient="auto">'
           '<path d="M0,0 L8,4 L0,8 z" fill="#333"/></marker></defs>',
           f'<rect x="0" y="0" width="{W}" height="{H}" fill="white"/>']
    for x1, y1, x2, y2_ in arrows:
        out.append(f'<line x1="{x1:.0f}" y1="{y1:.0f}" x2="{x2:.0f}" y2="{y2_:.0f}" stroke="#333" '
                   'stroke-width="1.5" marker-end="url(#arrow)"/>')
    for x, y_, w, h, lines in boxes:
        out.append(f'<g class="box"><rect x="{x:.0f}" y="{y_:.0f}" width="{w:.0f}" height="{h:.0f}" fill="#f7f7f7" '
                   'stroke="#333"/>')
        for k, text in enumerate(lines):
            out.append(f'<text x="{x + 8:.0f}" y="{y_ + 20 + 17 * k:.0f}" xml:space="preserve">'
                       f"{_xml_escape(text)}</text>")
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------ entry
def write_tables(est: dict, patients: pd.DataFrame | None, out_dir: str | Path) -> dict[str, Path]:
    """Write every table of ``results/<dataset>/tables/``; returns the paths by name."""
    from ..io.csvsafe import safe_csv

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df, notes = models_table(est)
    paths = {"models.md": out / "models.md", "models.tex": out / "models.tex", "models.csv": out / "models.csv",
             "descriptives.md": out / "descriptives.md", "descriptives.tex": out / "descriptives.tex",
             "descriptives.csv": out / "descriptives.csv", "flow.svg": out / "flow.svg"}
    paths["models.md"].write_text(render_markdown(df, notes, est), encoding="utf-8")
    paths["models.tex"].write_text(render_latex(df, notes, est), encoding="utf-8")
    safe_csv(csv_frame(df), paths["models.csv"])
    desc = descriptives_table(patients) if patients is not None else None
    if desc is None:
        desc = pd.DataFrame({"Variable": ["patients"], "all patients": [apa(est.get("n_patients"), "count")]})
    title = f"Table 2. Patients by arm, dataset {est.get('dataset', '')}"
    paths["descriptives.md"].write_text(render_simple_markdown(desc, title), encoding="utf-8")
    paths["descriptives.tex"].write_text(render_simple_latex(desc, title), encoding="utf-8")
    safe_csv(desc, paths["descriptives.csv"])
    paths["flow.svg"].write_text(flow_svg(est), encoding="utf-8")
    return paths
