"""The gateway: one API over local models and remote OpenAI-compatible deployments.

config (the TOML file) -> deployments (who may answer a name, in what order) ->
router (the ASGI seam: remote names to the proxy, the rest to selfhost's routes) ->
proxy (retries before the first byte, relay after it) -> usage + ledger (exact cost,
one database row per request). service.Gateway holds the pieces for the app.
"""
