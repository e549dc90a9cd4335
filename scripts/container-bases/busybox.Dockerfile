# Stand-in for busybox:1.37: Debian's static busybox alone in an empty image, with its applets
# (sh, cp, ls ...) linked in /bin, as upstream has them.
ARG ROOTFS
FROM ${ROOTFS} AS debian
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y -qq busybox-static >/dev/null \
 && rm -rf /var/lib/apt/lists/*

FROM scratch
COPY --from=debian /bin/busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
ENV PATH=/bin
CMD ["sh"]
