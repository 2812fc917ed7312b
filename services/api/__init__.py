"""The routes and their codecs: the JSON API, the language model's API, images, OIP v2, request schemas."""
