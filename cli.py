#!/usr/bin/env python3
"""`python cli.py ...` behaves exactly like `lotus ...`."""

from lotus_deploy.cli import main

if __name__ == "__main__":
    main(prog_name="lotus")
