"""``python -m walship``: the same as the ``walship`` command."""

from walship.cli.main import main

if __name__ == "__main__":
    main()
