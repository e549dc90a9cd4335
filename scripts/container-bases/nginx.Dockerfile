# Stand-in for nginx:1.28-alpine: Debian's nginx (bookworm's 1.22, older than the upstream image, so
# deploy/ is proven on an nginx without 1.27's features), logging to the container's output, with
# the features of the upstream entry point that deploy/ uses (see nginx-entrypoint.sh).
ARG ROOTFS
FROM ${ROOTFS}
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y -qq nginx gettext-base wget >/dev/null \
 && rm -rf /var/lib/apt/lists/* /etc/nginx/sites-enabled/* \
 && ln -sf /dev/stdout /var/log/nginx/access.log \
 && ln -sf /dev/stderr /var/log/nginx/error.log
COPY nginx-entrypoint.sh /docker-entrypoint.sh
RUN mkdir -p /docker-entrypoint.d /etc/nginx/templates
EXPOSE 80
STOPSIGNAL SIGQUIT
ENTRYPOINT ["/docker-entrypoint.sh"]
CMD ["nginx", "-g", "daemon off;"]
