"""``python -m imgflow ...`` runs the ``imgflow`` command."""

from imgflow.flows.cli import main

if __name__ == "__main__":
    main()
