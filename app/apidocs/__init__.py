"""The API's documentation page at ``/docs``, served without internet.

FastAPI's Swagger UI page normally loads its script and styles from a CDN, so it is blank on a
closed network. :func:`~app.apidocs.router.make_router` serves the same page with both files from
``static/`` (a vendored copy of the npm package ``swagger-ui-dist``; its version is in
``static/VERSION``, its licence beside it; ``scripts/vendor-swagger-ui`` replaces it).
"""
