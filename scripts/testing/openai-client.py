"""OpenAI's Python client against nvembed-model-server's /v1/embeddings (system test 10).
Usage: openai-client.py BASE_URL TOKEN CA_FILE MODEL < texts.json; prints what it got as JSON."""
import json
import sys

import openai

url, token, ca, model = sys.argv[1:5]
texts = json.load(sys.stdin)
client = openai.OpenAI(base_url=url, api_key=token, http_client=openai.DefaultHttpxClient(verify=ca))
out = {}
floats = client.embeddings.create(input=texts, model=model, encoding_format="float")
out["passage_float"] = [d.embedding for d in floats.data]
out["prompt_tokens"] = floats.usage.prompt_tokens
# Without encoding_format the client asks for base64 and decodes it itself.
out["passage_default"] = [d.embedding for d in client.embeddings.create(input=texts, model=model).data]
query = client.embeddings.create(input=texts[0], model=model, extra_body={"input_type": "query"})
out["query"] = query.data[0].embedding
try:
    openai.OpenAI(base_url=url, api_key="not-a-token-of-this-server", http_client=openai.DefaultHttpxClient(verify=ca)).embeddings.create(
        input=texts, model=model
    )
except openai.AuthenticationError as e:
    out["wrong_token"] = [e.status_code, e.body["code"]]
try:
    client.embeddings.create(input=texts, model=model, dimensions=8)
except openai.BadRequestError as e:
    out["dimensions"] = [e.status_code, e.body["code"]]
print(json.dumps(out))
