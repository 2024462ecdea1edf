# Named for what they do; every target works on a fresh clone.
.PHONY: install infinity run demo test lint helm bench-throughput bench-relevance bench-overhead bench-peers bench-profile es-start es-stop clean

install:            ## create .venv and install the proxy with its test tools
	bash scripts/install.sh

run:                ## install, start a local Elasticsearch if none is configured, run the proxy
	bash scripts/run.sh $(ARGS)

demo: install       ## one question asked of Elasticsearch and of the proxy, side by side (starts what it needs)
	.venv/bin/python scripts/demo.py $(ARGS)

test: install infinity   ## the whole test suite (starts real Elasticsearch 8/9 and OpenSearch 2/3, and infinity-emb; one alone: PYTEST_ARGS="-m os3")
	.venv/bin/python -m pytest -rs $(PYTEST_ARGS)

infinity: install   ## .venv-infinity: infinity-emb, the rerank server the remote-backend tests run (shares .venv's torch)
	bash scripts/infinity.sh >/dev/null

lint: install       ## ruff + strict mypy
	.venv/bin/ruff check proxy tests benchmarks
	.venv/bin/ruff format --check proxy tests benchmarks
	.venv/bin/mypy

helm: install       ## lint and render the Helm chart (deploy/helm/rerank-proxy); builds helm once (scripts/helm.sh)
	.venv/bin/python -m pytest -q tests/test_helm.py

bench-throughput: install   ## engine vs naive loop, latency at 1/8/32 clients (benchmarks/README.md)
	.venv/bin/python benchmarks/throughput.py $(ARGS)

bench-relevance: install    ## nDCG@10/MRR@10 on DL19, NovelEval, XQuAD, direct and through the proxy
	.venv/bin/python benchmarks/relevance.py $(ARGS)

bench-overhead: install     ## what the proxy itself adds to a request
	.venv/bin/python benchmarks/overhead.py $(ARGS)

bench-peers: install        ## engine vs CrossEncoder.predict and the infinity-emb server, same weights (benchmarks/README.md)
	.venv/bin/python -m pip install --quiet -e ".[peers]"
	bash scripts/infinity.sh >/dev/null
	.venv/bin/python benchmarks/peers.py $(ARGS)

bench-profile: install      ## where the proxy's CPU goes at 32 clients: forward pass vs the rest (py-spy; benchmarks/README.md)
	.venv/bin/python -m pip install --quiet -e ".[profile]"
	.venv/bin/python benchmarks/cpu_profile.py $(ARGS)

es-start:           ## a local Elasticsearch on 127.0.0.1:9200
	bash scripts/elasticsearch.sh start

es-stop:
	bash scripts/elasticsearch.sh stop

clean:               ## every environment and cache the build made in the clone
	rm -rf .venv .venv-infinity build *.egg-info .pytest_cache .mypy_cache .ruff_cache
