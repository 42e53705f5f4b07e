"""What evaluate shows: text tables shared by the CLI and the HTML report, plots, the report itself."""
