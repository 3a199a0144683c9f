"""`bitnet serve`: the engine thread that decodes every open request together (engine.py), the
OpenAI API around it (schema.py, prompts.py, replies.py, completions.py, routes.py), the chat page
(page.html) and the process that runs them (server.py). Imports the folders below it; the CLI
imports it only when serving."""
