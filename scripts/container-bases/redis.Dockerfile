# Stand-in for redis:7.4-alpine: Debian's redis-server, run as the redis user in /data like upstream.
ARG ROOTFS
FROM ${ROOTFS}
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y -qq redis-server >/dev/null \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /data && chown redis:redis /data
COPY redis-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
WORKDIR /data
VOLUME /data
USER redis
EXPOSE 6379
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["redis-server"]
