"""Reports: the research report, the therapist-level service report and the meta-analysis report.

All three are single self-contained HTML files (inline CSS, figures as base64 PNG, no scripts, no
network fetches, a print stylesheet), rendered with Jinja2 with autoescaping on.
"""

from ..io.csvsafe import safe_csv
from .meta import meta_report
from .research import research_report
from .service import service_report

__all__ = ["meta_report", "research_report", "safe_csv", "service_report"]
