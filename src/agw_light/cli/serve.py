"""The gallery search service: `python -m agw_light.serve index=<index dir> [host=127.0.0.1 port=8000]`, or
`python -m agw_light.serve backend=milvus uri=<gallery.db | http://host:19530> collection=<name>`.

Loads the index written by `python -m agw_light.search build` (a folder, or a Milvus collection) and the
checkpoint it records (a missing or changed checkpoint is refused, naming the file), then serves the JSON
API and the web page of `agw_light.service.app` with uvicorn until stopped (Ctrl-C). A Milvus gallery also
takes writes (POST and DELETE /gallery) from clients presenting `write_token` (or the AGW_LIGHT_WRITE_TOKEN
environment variable). Settings: conf/serve.yaml.
"""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig

from agw_light.cli import CONF_DIR

# Where the write token may come from instead of the config (so it stays out of command lines and logs).
WRITE_TOKEN_VARIABLE = "AGW_LIGHT_WRITE_TOKEN"


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="serve")
def main(cfg: DictConfig) -> None:
    # Imported here, not at the top, so that `--help` and `--cfg job` answer without loading torch.
    import uvicorn

    from agw_light.service.app import create_app, default_allowed_hosts, header_deadline_protocol
    from agw_light.service.gallery import GallerySearch

    encoding = {"device": cfg.device, "backend": cfg.encoder_backend, "concurrent_queries": cfg.concurrent_queries}
    try:
        if cfg.backend == "milvus":
            if not cfg.uri or not cfg.collection:
                raise ValueError("backend=milvus needs uri=<gallery.db | http://host:19530> and collection=<name>")
            gallery = GallerySearch.open_milvus(
                cfg.uri, cfg.collection, token=cfg.token, timeout=cfg.timeout, upload_dir=cfg.upload_dir, **encoding
            )
        elif cfg.backend == "in_process":
            if cfg.index is None:
                raise ValueError(
                    "backend=in_process needs index=<index dir> (or backend=milvus uri=... collection=...)"
                )
            gallery = GallerySearch.open(cfg.index, **encoding)
        else:
            raise ValueError(
                f"backend={cfg.backend!r}: expected in_process or milvus (the encoder's backend is encoder_backend=)"
            )
    except (OSError, ValueError, LookupError) as error:  # missing, changed, malformed, unreachable: one line
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
        write_token=cfg.write_token or os.environ.get(WRITE_TOKEN_VARIABLE) or None,
    )
    described = gallery.describe()
    print(
        f"serving {described['size']} gallery images ({described['index_kind']} index) from {gallery.index_dir} "
        f"at http://{cfg.host}:{cfg.port}/ (answering Host {', '.join(allowed_hosts)})",
        flush=True,
    )
    try:
        uvicorn.run(
            app,
            host=cfg.host,
            port=cfg.port,
            log_level=cfg.log_level,
            http=header_deadline_protocol(cfg.header_timeout_s),
        )
    finally:
        gallery.close()


if __name__ == "__main__":
    main()
