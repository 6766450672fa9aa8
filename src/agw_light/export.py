"""`python -m agw_light.export`: the command lives in `agw_light.cli.export`."""

from agw_light.cli.export import main

if __name__ == "__main__":
    main()
