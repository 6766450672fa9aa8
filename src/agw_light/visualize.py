"""`python -m agw_light.visualize`: the command lives in `agw_light.cli.visualize`."""

from agw_light.cli.visualize import main

if __name__ == "__main__":
    main()
