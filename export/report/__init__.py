"""Stage 5, report: the files a run leaves, written atomically: report.json / report.md and their pictures
(export_report), bench.json / bench.md / bench.png (bench_report), the plots both embed (pictures)."""
