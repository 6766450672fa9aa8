"""The gallery search service: a saved index and its model behind a JSON API and one web page.

`gallery.GallerySearch` loads an index (`agw_light.search`) and the checkpoint that built it, refusing a
missing or changed checkpoint, and answers queries from uploaded image bytes; `app.create_app` puts it
behind FastAPI (`python -m agw_light.serve`, `agw_light.cli.serve`). `page.html` is the web page.
"""
