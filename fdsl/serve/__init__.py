"""`fdsl serve`: a local web app (FastAPI + uvicorn) around one fitted detector.

    fdsl serve --detector part.fdsl            # http://127.0.0.1:8000/

`fdsl.serve.app.create_app` builds the application; `fdsl.cli.serve` is the command. Needs the `serve` extra
(``pip install -e ".[serve]"``).
"""
