"""The HTTP side of the service: the app factory, middleware, the one error renderer, the
request dependencies, response schemas and the routes by resource. It parses and authenticates
a request, calls the core (orders, wallets, webhooks, statements, ...) and sends its answer; the
core knows nothing of this package."""
