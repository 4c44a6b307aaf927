"""A small typed client for backend callers (httpx), sync and async.

    with ClassifierClient("http://localhost:8000") as c:
        result = c.classify(open("tomato.png", "rb").read(), "a cherry tomato on the table")
        print(result.label, result.confidence)
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import httpx


class ClassifierError(RuntimeError):
    """A non-2xx answer: ``status``, ``code`` and ``message`` from the service's error body."""

    def __init__(self, status: int, code: str, message: str, request_id: str = "") -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.request_id = status, code, message, request_id


@dataclass
class Classification:
    label: str | None  # None when the service abstained (see abstain_reason; predictions still hold its guesses)
    confidence: float
    predictions: list[tuple[str, float]]
    model: dict[str, str]
    request_id: str
    text_attention: list[tuple[str, float]] | None = None
    abstained: bool = False
    abstain_reason: str | None = None  # low_confidence | out_of_distribution
    ood_score: float | None = None  # above 1.0: unlike the model's training data
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Classification:
        att = d.get("text_attention")
        return cls(d["label"], float(d["confidence"]), [(p["label"], float(p["score"])) for p in d["predictions"]],
                   dict(d["model"]), d["request_id"],
                   [(t["token"], float(t["weight"])) for t in att] if att is not None else None,
                   bool(d.get("abstained", False)), d.get("abstain_reason"), d.get("ood_score"), d)


def _raise_for(resp: httpx.Response) -> None:
    if resp.is_success:
        return
    try:
        err = resp.json()["error"]
        raise ClassifierError(resp.status_code, err["code"], err["message"], err.get("request_id", ""))
    except (ValueError, KeyError, TypeError):
        raise ClassifierError(resp.status_code, "http_error", resp.text[:200]) from None


def _batch_results(resp: httpx.Response) -> list[Classification | ClassifierError]:
    _raise_for(resp)
    out: list[Classification | ClassifierError] = []
    for r in resp.json()["results"]:
        if "error" in r:
            out.append(ClassifierError(200, r["error"]["code"], r["error"]["message"]))
        else:
            out.append(Classification.from_json(r))
    return out


def _batch_body(items: list[tuple[bytes, str]]) -> dict[str, Any]:
    return {"items": [{"image_base64": base64.b64encode(img).decode(), "description": d} for img, d in items]}


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class ClassifierClient:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self._http = httpx.Client(base_url=base_url, headers=_headers(api_key), timeout=timeout, transport=transport)

    def classify(self, image: bytes, description: str = "", top_k: int = 3, explain: bool = False,
                 filename: str = "image") -> Classification:
        resp = self._http.post("/classify", params={"top_k": top_k, "explain": str(explain).lower()},
                               files={"image": (filename, image, "application/octet-stream")},
                               data={"description": description})
        _raise_for(resp)
        return Classification.from_json(resp.json())

    def classify_batch(self, items: list[tuple[bytes, str]], top_k: int = 3) -> list[Classification | ClassifierError]:
        return _batch_results(self._http.post("/classify/batch", params={"top_k": top_k}, json=_batch_body(items)))

    def ready(self) -> bool:
        return self._http.get("/readyz").status_code == 200

    def model(self) -> dict[str, Any]:
        resp = self._http.get("/model")
        _raise_for(resp)
        return dict(resp.json())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ClassifierClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClassifierClient:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._http = httpx.AsyncClient(base_url=base_url, headers=_headers(api_key), timeout=timeout, transport=transport)

    async def classify(self, image: bytes, description: str = "", top_k: int = 3, explain: bool = False,
                       filename: str = "image") -> Classification:
        resp = await self._http.post("/classify", params={"top_k": top_k, "explain": str(explain).lower()},
                                     files={"image": (filename, image, "application/octet-stream")},
                                     data={"description": description})
        _raise_for(resp)
        return Classification.from_json(resp.json())

    async def classify_batch(self, items: list[tuple[bytes, str]], top_k: int = 3) -> list[Classification | ClassifierError]:
        return _batch_results(await self._http.post("/classify/batch", params={"top_k": top_k}, json=_batch_body(items)))

    async def ready(self) -> bool:
        return (await self._http.get("/readyz")).status_code == 200

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClassifierClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
