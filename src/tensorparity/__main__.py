"""``python -m tensorparity``: the same CLI as the ``tensorparity`` console script."""

from tensorparity.cli import main

if __name__ == "__main__":
    main()
