"""System R of `make bench`: the reference Python gateway as the tutorial builds it (FastAPI,
httpx, python-jose, Redis with its Lua sliding-window limiter, one uvicorn worker), condensed
into one file with the tutorial's code paths: route match, JWT (HS256) with the Redis blacklist,
the three sliding-window limits (route, user, IP) as one Lua call each, a JSON log line, the
identity headers, and the forward through an httpx client. Configured by the environment:
UPSTREAM (http://127.0.0.1:port), REDIS_URL, JWT_SECRET. Run by bench.py only."""
import json
import logging
import os
import time
import uuid

import httpx
import redis
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import Response
from jose import JWTError, jwt

SECRET_KEY = os.environ["JWT_SECRET"]
ALGORITHM = "HS256"
ROUTES = [{"name": "bench", "prefix": "/api/v1/bench", "upstream": os.environ["UPSTREAM"],
           "methods": ["GET"], "auth_required": True, "timeout": 5,
           "rate_limit": {"enabled": True, "max_calls": 1_000_000_000, "period": 1}}]
redis_client = redis.from_url(os.environ["REDIS_URL"])

RATE_LIMIT_SCRIPT = """
local key = KEYS[1]
local max_calls = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', key, 0, now - period * 1000)
local count = redis.call('ZCARD', key)
if count < max_calls then
    redis.call('ZADD', key, now, now .. math.random())
    redis.call('EXPIRE', key, period + 1)
    return 1
else
    return 0
end
"""

logging.basicConfig(level=logging.INFO, format="%(message)s")
log = logging.getLogger("gateway")
app = FastAPI(title="API Gateway")
client = httpx.AsyncClient()


def match(path, method):
    for route in sorted(ROUTES, key=lambda r: len(r["prefix"]), reverse=True):
        if path.startswith(route["prefix"]) and method in route["methods"]:
            return route
    return None


async def auth_middleware(request: Request, route):
    if not route.get("auth_required", True):
        return None
    authorization = request.headers.get("Authorization")
    if not authorization:
        raise HTTPException(status_code=401, detail="Authorization header missing")
    parts = authorization.split(" ")
    if len(parts) != 2 or parts[0].lower() != "bearer":
        raise HTTPException(status_code=401, detail="Invalid authorization format. Expected: Bearer <token>")
    token = parts[1]
    try:
        payload = jwt.decode(token, SECRET_KEY, algorithms=[ALGORITHM])
    except JWTError as e:
        raise HTTPException(status_code=401, detail=f"Invalid token: {e}")
    if redis_client.exists(f"token:blacklist:{token}"):
        raise HTTPException(status_code=401, detail="Token has been revoked")
    return {"user_id": payload.get("sub"), "user_name": payload.get("name"), "role": payload.get("role", "user")}


async def rate_limit_middleware(request: Request, route, user_info):
    rate = route.get("rate_limit", {})
    if not rate.get("enabled", False):
        return
    max_calls, period, now = rate.get("max_calls", 100), rate.get("period", 1), int(time.time() * 1000)
    checks = [(f"rate_limit:api:{route['name']}", max_calls)]
    if user_info:
        checks.append((f"rate_limit:user:{user_info['user_id']}:{route['name']}", max_calls // 10))
    checks.append((f"rate_limit:ip:{request.client.host}", 1000))
    for key, limit in checks:
        if not redis_client.eval(RATE_LIMIT_SCRIPT, 1, key, limit, period, now):
            raise HTTPException(status_code=429, detail={"error": "Too Many Requests"})


@app.api_route("/api/v1/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
async def gateway_handler(request: Request, path: str):
    trace_id = str(uuid.uuid4())
    start = time.time()
    route = match(request.url.path, request.method)
    if not route:
        raise HTTPException(status_code=404, detail="Route not found")
    user_info = await auth_middleware(request, route)
    await rate_limit_middleware(request, route, user_info)
    log.info(json.dumps({"trace_id": trace_id, "method": request.method, "path": request.url.path,
                         "user_id": user_info and user_info["user_id"], "client_ip": request.client.host}))
    headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
    headers.update({"X-Trace-ID": trace_id, "X-Gateway": "python-gateway"})
    if user_info:
        headers.update({"X-User-ID": user_info["user_id"] or "", "X-User-Name": user_info["user_name"] or "",
                        "X-User-Role": user_info["role"] or ""})
    upstream = await client.request(request.method, route["upstream"] + request.url.path, headers=headers,
                                    params=request.query_params, content=await request.body(),
                                    timeout=route.get("timeout", 5))
    duration_ms = (time.time() - start) * 1000
    out = Response(content=upstream.content, status_code=upstream.status_code,
                   media_type=upstream.headers.get("content-type"))
    out.headers["X-Trace-ID"] = trace_id
    out.headers["X-Response-Time"] = f"{duration_ms:.2f}ms"
    return out
