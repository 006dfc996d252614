"""``python -m report``: the analysts' HTML report (report/build.py)."""

from report.build import main

main()
