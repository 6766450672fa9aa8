"""`python -m agw_light.serve`: the command lives in `agw_light.cli.serve`."""

from agw_light.cli.serve import main

if __name__ == "__main__":
    main()
