"""`python -m agw_light.search`: the command lives in `agw_light.cli.search`."""

from agw_light.cli.search import main

if __name__ == "__main__":
    main()
