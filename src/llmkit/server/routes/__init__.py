"""The server's routes, one router per concern; ``llmkit.server.app.create_app`` includes them all."""

from llmkit.server.routes import completions, embeddings, messages, page, rerank, responses, status, tokens

ROUTERS = [status.router, tokens.router, embeddings.router, completions.router, responses.router, messages.router,
           rerank.router, page.router]
