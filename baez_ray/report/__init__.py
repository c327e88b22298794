"""Reports: tables → numbers, PNG plots and HTML pieces (one module per stage)."""
