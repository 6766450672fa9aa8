"""`python -m agw_light.convert`: the command lives in `agw_light.cli.convert`."""

from agw_light.cli.convert import main

if __name__ == "__main__":
    main()
