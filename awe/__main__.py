"""``python -m awe``: the command line (the typer app lives in the ``cli`` package)."""

from cli.main import main

if __name__ == "__main__":
    main()
