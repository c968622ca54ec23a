"""The tutorial's scheme 1, reproduced as written: FastAPI + llama-cpp-python (one Llama,
called inside ``async def``), serving OpenAI's chat completions. Only the model's path and
name come from the environment, and the port from the command line; everything else but two
marked changes is the tutorial's code: a validator for content parts (the benchmark client's
form), and ``ignore_eos`` (which the benchmark sends every server, so that every server writes
the same number of tokens). A baseline for ./scripts/bench anchors, not part of the service."""

import json
import os
import sys
import time
import uuid

from fastapi import FastAPI, HTTPException
from fastapi.middleware.cors import CORSMiddleware
from llama_cpp import Llama
from pydantic import BaseModel, Field, field_validator
from sse_starlette.sse import EventSourceResponse

MODEL_PATH = os.environ["SCHEME1_MODEL_PATH"]  # the tutorial: "./Hermes-3-Llama-3.1-8B-Q5_K_M.gguf"
MODEL_NAME = os.environ.get("SCHEME1_MODEL_NAME", "hermes-3-8b")

app = FastAPI(title="Hermes API", version="1.0.0")
app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])

llm = Llama(model_path=MODEL_PATH, n_ctx=8192, n_gpu_layers=-1, chat_format="chatml", verbose=False)


class Message(BaseModel):
    role: str
    content: str

    # Not in the tutorial: the one change. The benchmark client (vLLM's) sends OpenAI's
    # content-parts form, which the tutorial's `content: str` refuses with a 422; its text
    # parts are joined into the string the tutorial's code expects.
    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, value):
        if isinstance(value, list):
            return "".join(part.get("text", "") for part in value if isinstance(part, dict))
        return value


class ChatRequest(BaseModel):
    model: str = MODEL_NAME
    messages: list[Message]
    temperature: float = Field(default=0.7, ge=0, le=2)
    top_p: float = Field(default=0.9, ge=0, le=1)
    max_tokens: int = Field(default=1024, ge=1, le=8192)
    stream: bool = False
    stop: list[str] | None = None
    # Not in the tutorial: the second change. vLLM's `ignore_eos`, which the benchmark sends
    # every server: the model's end tokens are banned, so each answer runs to max_tokens and
    # scheme 1 does the same work as the others (left out, its answers to random prompts often
    # end at once, each still costing a prefill).
    ignore_eos: bool = False


def end_bias(request: ChatRequest) -> dict[str, float] | None:
    """The second change: a logit bias that bans the end tokens when ``ignore_eos`` is asked."""
    if not request.ignore_eos:
        return None
    ends = {llm.token_eos(), *llm.tokenize(b"<|im_end|>", add_bos=False, special=True)}
    return {str(token): -1e9 for token in ends}


@app.get("/v1/models")
async def list_models():
    return {
        "object": "list",
        "data": [{"id": MODEL_NAME, "object": "model", "created": int(time.time()), "owned_by": "local"}],
    }


@app.post("/v1/chat/completions")
async def chat_completions(request: ChatRequest):
    try:
        messages = [{"role": m.role, "content": m.content} for m in request.messages]

        if request.stream:
            return EventSourceResponse(stream_response(messages, request), media_type="text/event-stream")

        response = llm.create_chat_completion(
            messages=messages,
            temperature=request.temperature,
            top_p=request.top_p,
            max_tokens=request.max_tokens,
            stop=request.stop,
            logit_bias=end_bias(request),  # the second change
        )

        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:8]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": response["choices"][0]["message"]["content"]},
                    "finish_reason": response["choices"][0].get("finish_reason", "stop"),
                }
            ],
            "usage": response["usage"],
        }
    except Exception as e:
        raise HTTPException(status_code=500, detail=str(e))


async def stream_response(messages, request):
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:8]}"
    stream = llm.create_chat_completion(
        messages=messages,
        temperature=request.temperature,
        top_p=request.top_p,
        max_tokens=request.max_tokens,
        stop=request.stop,
        stream=True,
        logit_bias=end_bias(request),  # the second change
    )
    for chunk in stream:
        delta = chunk["choices"][0].get("delta", {})
        finish_reason = chunk["choices"][0].get("finish_reason")
        data = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": request.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
        yield {"data": json.dumps(data, ensure_ascii=False)}
    yield {"data": "[DONE]"}


@app.get("/health")
async def health_check():
    return {"status": "ok", "model": MODEL_NAME}


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]) if len(sys.argv) > 1 else 8000)
