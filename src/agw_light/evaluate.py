"""`python -m agw_light.evaluate`: the command lives in `agw_light.cli.evaluate`."""

from agw_light.cli.evaluate import main

if __name__ == "__main__":
    main()
