"""The WSGI entry point for gunicorn (``app:app``) and ``flask run``."""

from vmmgate.web import create_app

app = create_app()
