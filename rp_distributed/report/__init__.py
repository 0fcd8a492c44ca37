"""What a data steward sees: ``report.html`` beside the manifest, and ``rp-anonymize inspect`` in the terminal.

Both read the manifest's **latest view** (for each input, the rows of the latest run that processed it) a part
and a batch at a time, and hold only fixed-size figures (``facts``): memory does not grow with the manifest.
``run_job`` writes ``report.html`` at the end of every run, and ``rp-anonymize report OUTPUT_URI`` rebuilds it
from any finished or partial manifest. Rooms: ``latest`` (the view), ``sketch`` and ``tries`` (streaming
figures), ``facts``, ``plots``, ``gallery``, ``html``, ``inspect``, ``runinfo`` (each run's config beside the
manifest)."""

from .facts import Facts, faces_per_hour, load
from .gallery import thumbnail
from .html import privacy_line, render, write_report
from .inspect import inspect_text
from .runinfo import REPORT_NAME, read_run_info, report_uri, run_info_uri, write_run_info

__all__ = ["Facts", "faces_per_hour", "load", "thumbnail", "privacy_line", "render", "write_report", "inspect_text",
           "REPORT_NAME", "read_run_info", "report_uri", "run_info_uri", "write_run_info"]
