"""Browser clients on another origin (a dev server) can call the API and read its errors."""

from helpers import assert_error


def test_a_preflight_for_a_json_post_is_allowed_without_a_token(anonymous):
    response = anonymous.options(
        "/mutate",
        headers={
            "Origin": "http://localhost:5173",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in response.headers["Access-Control-Allow-Methods"]
    assert "Content-Type" in response.headers["Access-Control-Allow-Headers"]
    assert "Authorization" in response.headers["Access-Control-Allow-Headers"]
    assert "Loco-Schema-Version" in response.headers["Access-Control-Allow-Headers"]  # the adapter's schemaVersion option


def test_answers_and_errors_both_carry_the_cors_headers(client, anonymous):
    assert client.get("/sync", headers={"Origin": "http://localhost:5173"}).headers["Access-Control-Allow-Origin"] == "*"
    response = client.post("/mutate", json={"changes": []}, headers={"Origin": "http://localhost:5173"})
    assert_error(response, 400, "invalid_request")
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "Retry-After" in response.headers["Access-Control-Expose-Headers"]
    unauthorized = anonymous.get("/sync", headers={"Origin": "http://localhost:5173"})
    assert_error(unauthorized, 401, "unauthorized", type="auth")
    assert unauthorized.headers["Access-Control-Allow-Origin"] == "*"
