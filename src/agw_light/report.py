"""`python -m agw_light.report`: the command lives in `agw_light.cli.report`."""

from agw_light.cli.report import main

if __name__ == "__main__":
    raise SystemExit(main())
