"""Floors for the request rates: the real app, plus two endpoints that stop early.

GET /floor/auth checks the token and answers; POST /floor/validate also
parses, validates and fingerprints a mutation, and writes nothing. What is
left between these and the real endpoints is what reading and writing the
log costs; what is between them and the no-op endpoint, every request pays.
"""

from flask import request

from app import MutateSchema, create_app, fingerprint, json_body, load, shared, user_for_token

app = create_app()


@app.get("/floor/auth")
def authenticated_noop():
    user_for_token(request.headers.get("Authorization"))
    return {"ok": True}


@app.post("/floor/validate")
def validated_mutation():
    user_for_token(request.headers.get("Authorization"))
    body = json_body()
    load(shared(MutateSchema), body)
    fingerprint(body["changes"])
    return {"lastSyncId": 0}
