"""``python -m lotus_deploy``: the ``lotus`` command line (what ``torchrun -m lotus_deploy`` starts on every rank)."""

from lotus_deploy.cli import main

if __name__ == "__main__":
    main(prog_name="lotus")
