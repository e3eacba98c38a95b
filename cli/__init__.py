"""The `dlnc` command line: thin Typer commands over the `compressor` library."""
