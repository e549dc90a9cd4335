# Stand-in for pgvector/pgvector:pg17: Debian's PostgreSQL 17 and pgvector, with an entry point that
# honours the upstream variables (POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB) and init scripts.
ARG ROOTFS
FROM ${ROOTFS}
ARG DEBIAN_FRONTEND=noninteractive
# The package would create and start a cluster of its own; the entry point makes the one we need.
RUN mkdir -p /etc/postgresql-common/createcluster.d \
 && echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.d/no-main-cluster.conf \
 && apt-get update \
 && apt-get install -y -qq postgresql-17 postgresql-17-pgvector >/dev/null \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/lib/postgresql/data /docker-entrypoint-initdb.d /var/run/postgresql \
 && chown postgres:postgres /var/lib/postgresql/data /var/run/postgresql \
 && chmod 700 /var/lib/postgresql/data
COPY pgvector-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
ENV PATH=/usr/lib/postgresql/17/bin:$PATH PGDATA=/var/lib/postgresql/data LANG=C.UTF-8
VOLUME /var/lib/postgresql/data
USER postgres
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
