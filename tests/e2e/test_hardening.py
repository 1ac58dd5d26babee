"""Regression tests for the findings of the outside attack on the gateway (one test per finding,
named after it). Real Envoy, webdis and Redis."""

import concurrent.futures
import time
import uuid

from harness import bearer, forge, wait_for


def user_token(sub=None, ttl=600, role="user", iat=None):
    sub = sub or f"u-{uuid.uuid4().hex[:8]}"
    now = int(time.time()) if iat is None else iat
    return sub, forge({"alg": "HS256", "typ": "JWT"},
                      {"sub": sub, "name": "n", "role": role, "iat": now, "exp": now + ttl,
                       "jti": uuid.uuid4().hex})


def admin():
    return user_token(sub="root", role="admin")[1]


def post(gw, path, tok):
    return gw.request("POST", path, bearer(tok))


def test_finding_1_a_logged_out_token_stays_refused_past_exp(gw):
    """The verifier accepts a token until exp + 60 s of skew: the blacklist entry must last as
    long, and refresh must refuse a token past exp."""
    _, tok = user_token(ttl=2)
    assert post(gw, "/api/v1/auth/logout", tok).status == 200
    exp = int(time.time()) + 2
    wait_for(lambda: time.time() > exp + 1, timeout=5, what="exp to pass", interval=0.2)
    r = gw.get("/api/v1/users/1", bearer(tok))
    assert r.status == 401 and r.json()["message"] == "Token has been revoked", r
    # A token past exp (still inside the skew) buys no new token.
    _, late = user_token(ttl=95, iat=int(time.time()) - 100)  # exp 5 s ago
    assert gw.get("/api/v1/users/1", bearer(late)).status == 200, "accepted within the skew"
    r = post(gw, "/api/v1/auth/refresh", late)
    assert r.status == 401 and r.json()["message"] == "Invalid token: token has expired", r


def test_finding_2_a_ban_cannot_be_outrun_by_refreshing(gw):
    sub, tok = user_token()
    assert gw.get("/api/v1/users/1", bearer(tok)).status == 200
    r = post(gw, f"/api/v1/admin/users/{sub}/revoke", admin())
    assert r.status == 200, r
    banned_at = r.json()["revoked_before"]
    # A token minted in the ban's second (a refresh racing the ban) is refused.
    _, same_second = user_token(sub=sub, iat=banned_at)
    assert gw.get("/api/v1/users/1", bearer(same_second)).status == 401
    # Refresh checks the ban before minting.
    r = post(gw, "/api/v1/auth/refresh", tok)
    assert r.status == 401 and r.json()["message"] == "Token has been revoked", r
    r = post(gw, "/api/v1/auth/refresh", same_second)
    assert r.status == 401, r
    # The next second's tokens work.
    _, after = user_token(sub=sub, iat=banned_at + 1)
    wait_for(lambda: time.time() >= banned_at + 1, timeout=3, what="the next second", interval=0.1)
    assert gw.get("/api/v1/users/1", bearer(after)).status == 200


def test_finding_8_concurrent_refreshes_mint_one_token(gw):
    for _ in range(3):
        _, tok = user_token()
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            replies = list(pool.map(lambda _: post(gw, "/api/v1/auth/refresh", tok), range(12)))
        minted = [r for r in replies if r.status == 200]
        assert len(minted) == 1, [r.status for r in replies]
        assert all(r.status == 401 for r in replies if r.status != 200), [r.status for r in replies]
        fresh = minted[0].json()["access_token"]
        assert gw.get("/api/v1/users/1", bearer(fresh)).status == 200
