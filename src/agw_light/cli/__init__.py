"""The commands: each reads Hydra or argv and calls the library. No command imports another.

python -m agw_light.train       train (then evaluate) one table row        agw-train
python -m agw_light.evaluate    evaluate a checkpoint: one metrics row      agw-evaluate
python -m agw_light.visualize   ranked-list pictures of a checkpoint        agw-visualize
python -m agw_light.report      a sweep's results table and plots           agw-report
python -m agw_light.search      build / query a saved gallery index         agw-search
python -m agw_light.export      a checkpoint as ONNX, with its metadata     agw-export
python -m agw_light.convert     another framework's model as a checkpoint   agw-convert
python -m agw_light.serve       gallery search: JSON API and web page       agw-serve
"""

from pathlib import Path

# The Hydra configs: the repository's top-level conf/, which the package links to and a wheel carries.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def register_configs() -> None:
    """Registers the typed schemas of config groups (the `eval` section: `agw_light.protocol.EvaluationProtocol`,
    its defaults in that one place) with Hydra's ConfigStore, where `eval: default` finds it."""
    from hydra.core.config_store import ConfigStore

    from agw_light.protocol import EvaluationProtocol

    ConfigStore.instance().store(group="eval", name="default", node=EvaluationProtocol)


register_configs()
