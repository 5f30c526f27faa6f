# cellgate: the gateway, its CLI and the demo upstream in one image.
#   docker build -t cellgate .
#   docker run --rm -p 127.0.0.1:8080:8080 cellgate demo --listen 0.0.0.0:8080
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release -p cellgate \
 && install -m 0755 target/release/cellgate /usr/local/bin/cellgate

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home /var/lib/cellgate --create-home cellgate \
 && install -d -o cellgate -g cellgate /var/lib/cellgate/state
COPY --from=build /usr/local/bin/cellgate /usr/local/bin/cellgate
COPY examples/demo.yaml /etc/cellgate/demo.yaml
COPY deploy/compose-cellgate.yaml /etc/cellgate/compose.yaml
USER cellgate
WORKDIR /var/lib/cellgate
EXPOSE 8080 9901
ENTRYPOINT ["cellgate"]
CMD ["demo", "--listen", "0.0.0.0:8080"]
