"""`python -m cli`: the `dlnc` app (as the `dlnc` command runs it)."""

from cli.main import app

if __name__ == "__main__":
    app(prog_name="dlnc")
