"""`pdgrpc generate`: stream one answer from a coordinator to stdout."""

from __future__ import annotations

import dataclasses
import json
import sys

from pdgrpc.client import Client
from pdgrpc.errors import PdgrpcError
from pdgrpc.types import GenerateDelta, GenerateFinal


def add_arguments(parser) -> None:
    parser.add_argument("prompt", help="the prompt text")
    parser.add_argument("--coordinator", default="127.0.0.1:50051", help="coordinator HOST:PORT")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--chat", action="store_true", help="send the prompt as a user turn (chat template)")
    parser.add_argument("--system", default=None, help="with --chat: a system turn first")
    parser.add_argument("--json", action="store_true", help="after the text, print the final message as JSON")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="deadline of the request")
    parser.add_argument("--token", default=None, help="auth token (default $PDGRPC_AUTH_TOKEN)")
    parser.add_argument("--tls-ca", default=None, help="PEM root to verify a TLS coordinator (default $PDGRPC_TLS_CA)")


def final_as_dict(final: GenerateFinal) -> dict:
    d = dataclasses.asdict(final)
    d["finish_reason"] = final.finish_reason.value
    return d


def main(args) -> int:
    kwargs = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                  seed=args.seed, stop=args.stop, timeout_s=args.timeout_s)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.prompt})
        kwargs["messages"] = messages
        prompt = None
    else:
        prompt = args.prompt
    try:
        with Client(args.coordinator, token=args.token, tls_ca=args.tls_ca) as client:
            for event in client.generate(prompt, **kwargs):
                if isinstance(event, GenerateDelta):
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
                elif isinstance(event, GenerateFinal):
                    sys.stdout.write("\n")
                    if args.json:
                        print(json.dumps(final_as_dict(event)))
    except PdgrpcError as err:
        print(f"\npdgrpc generate: {err.code.value}: {err.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
