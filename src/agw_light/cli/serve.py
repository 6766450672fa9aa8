"""The gallery search service: `python -m agw_light.serve index=<index dir> [host=127.0.0.1 port=8000]`.

Loads the index written by `python -m agw_light.search build` and the checkpoint its manifest records (a
missing or changed checkpoint is refused, naming the file), then serves the JSON API and the web page of
`agw_light.service.app` with uvicorn until stopped (Ctrl-C). Settings: conf/serve.yaml.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from agw_light.cli import CONF_DIR


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="serve")
def main(cfg: DictConfig) -> None:
    # Imported here, not at the top, so that `--help` and `--cfg job` answer without loading torch.
    import uvicorn

    from agw_light.service.app import create_app, default_allowed_hosts, header_deadline_protocol
    from agw_light.service.gallery import GallerySearch

    try:
        gallery = GallerySearch.open(
            cfg.index, device=cfg.device, backend=cfg.backend, concurrent_queries=cfg.concurrent_queries
        )
    except (OSError, ValueError) as error:  # missing, changed, malformed: the one-line reason, no traceback
        raise SystemExit(f"serve: {error}") from error
    allowed_hosts = default_allowed_hosts(cfg.host) if cfg.allowed_hosts is None else list(cfg.allowed_hosts)
    app = create_app(
        gallery,
        max_upload_bytes=cfg.max_upload_bytes,
        max_image_pixels=cfg.max_image_pixels,
        max_k=cfg.max_k,
        thumb_size=tuple(cfg.thumb_size),
        allowed_hosts=allowed_hosts,
        body_timeout_s=cfg.body_timeout_s,
    )
    described = gallery.describe()
    print(
        f"serving {described['size']} gallery images ({described['index_kind']} index) from {cfg.index} "
        f"at http://{cfg.host}:{cfg.port}/ (answering Host {', '.join(allowed_hosts)})",
        flush=True,
    )
    uvicorn.run(
        app,
        host=cfg.host,
        port=cfg.port,
        log_level=cfg.log_level,
        http=header_deadline_protocol(cfg.header_timeout_s),
    )


if __name__ == "__main__":
    main()
