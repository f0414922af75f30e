/*
 * vu_echo: the "C floor" vfio-user server - protocol-correct framing with no device
 * logic at all, i.e. as fast as a vfio-user server can possibly be.
 *
 *   vu_echo SOCKET          (or --socket-path=PATH)   [--epoll] [--verbose]
 *
 * Unlinks a stale SOCKET, listens, prints "listening SOCKET" on stdout once connect()
 * will succeed, accepts ONE client and serves it until it disconnects (exit 0).
 *   VERSION (first message only)  -> 0.0 + {"capabilities":{"max_msg_fds":8,
 *                                    "max_data_xfer_size":1048576}} + NUL, never
 *                                    longer than the request
 *   DEVICE_GET_INFO               -> argsz 16, flags PCI|RESET, 9 regions, 5 IRQs
 *   DEVICE_GET_REGION_INFO        -> region 7 (config) 256 bytes READ|WRITE, others size 0
 *   DEVICE_GET_IRQ_INFO           -> count 0 for every index
 *   REGION_READ                   -> echo + `count` bytes of a fixed pattern
 *   REGION_WRITE                  -> echo (data discarded)
 *   anything else                 -> EINVAL error reply (nothing if No_reply is set)
 * Requests are read with a buffered recv loop; each reply goes out with one send().
 * --epoll: wait for each read in epoll_wait, then recv without blocking - the system calls an
 * event-loop server (libuv's, ours) makes per message - instead of blocking in recv.
 * Exits 0 on SIGTERM/SIGINT (removing SOCKET) and 1 on a protocol or I/O error.
 */
#define _GNU_SOURCE
#include "vu_common.h"

#include <signal.h>
#include <sys/un.h>
#include <unistd.h>

#define NUM_REGIONS 9u
#define NUM_IRQS 5u
#define DEV_FLAGS 3u /* VFIO_DEVICE_FLAGS_RESET | VFIO_DEVICE_FLAGS_PCI */

static const char VERSION_JSON[] = "{\"capabilities\":{\"max_msg_fds\":8,\"max_data_xfer_size\":1048576}}";
static const char *sock_path;
static int verbose;
static int use_epoll;

/* Reply buffer for REGION_READ: the 32-byte front is rewritten per reply, the data
 * area holds a fixed pattern written once. */
static uint8_t read_reply[32 + VU_MAX_DATA_XFER];

static void on_signal(int sig)
{
    (void)sig;
    if (sock_path) unlink(sock_path);
    _exit(0);
}

static void fail(const char *what, const char *detail)
{
    fprintf(stderr, "vu_echo: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
    unlink(sock_path);
    exit(1);
}

static void reply(int fd, const uint8_t *p, size_t len)
{
    if (vu_send_all(fd, p, len) < 0) fail("send", strerror(errno));
}

static void reply_error(int fd, const uint8_t *req, uint32_t err)
{
    uint8_t r[16];
    vu_put_hdr(r, vu_get16(req), vu_get16(req + 2), 16, VU_FLAG_TYPE_REPLY | VU_FLAG_ERROR, err);
    reply(fd, r, sizeof r);
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        if (!strncmp(argv[i], "--socket-path=", 14)) sock_path = argv[i] + 14;
        else if (!strcmp(argv[i], "--verbose")) verbose = 1;
        else if (!strcmp(argv[i], "--epoll")) use_epoll = 1;
        else if (argv[i][0] != '-' && !sock_path) sock_path = argv[i];
        else {
            fprintf(stderr, "usage: vu_echo SOCKET [--epoll] [--verbose]\n");
            return 2;
        }
    }
    if (!sock_path) {
        fprintf(stderr, "usage: vu_echo SOCKET [--epoll] [--verbose]\n");
        return 2;
    }

    struct sigaction sa_sig = { .sa_handler = on_signal };
    sigaction(SIGTERM, &sa_sig, NULL);
    sigaction(SIGINT, &sa_sig, NULL);
    signal(SIGPIPE, SIG_IGN);

    for (size_t i = 0; i < VU_MAX_DATA_XFER; i++) read_reply[32 + i] = (uint8_t)(0xa5 ^ i);

    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    if (strlen(sock_path) >= sizeof sa.sun_path) {
        fprintf(stderr, "vu_echo: socket path too long: %s\n", sock_path);
        return 1;
    }
    strcpy(sa.sun_path, sock_path);
    if (unlink(sock_path) < 0 && errno != ENOENT) {
        fprintf(stderr, "vu_echo: unlink %s: %s\n", sock_path, strerror(errno));
        return 1;
    }
    int lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (lfd < 0) fail("socket", strerror(errno));
    if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0) {
        fprintf(stderr, "vu_echo: bind %s: %s\n", sock_path, strerror(errno));
        return 1;
    }
    if (listen(lfd, 1) < 0) fail("listen", strerror(errno));
    printf("listening %s\n", sock_path);
    fflush(stdout);

    int fd;
    do fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
    while (fd < 0 && errno == EINTR);
    if (fd < 0) fail("accept", strerror(errno));
    close(lfd);

    struct vu_reader rd;
    if (vu_reader_init(&rd, fd, VU_MAX_MSG + 64 * 1024) < 0) fail("out of memory", NULL);
    if (use_epoll) {
        struct epoll_event ev = { .events = EPOLLIN };
        rd.epfd = epoll_create1(EPOLL_CLOEXEC);
        if (rd.epfd < 0 || epoll_ctl(rd.epfd, EPOLL_CTL_ADD, fd, &ev) < 0) fail("epoll", strerror(errno));
    }

    int versioned = 0;
    uint64_t handled = 0;
    for (;;) {
        uint8_t *m;
        const char *err = NULL;
        ssize_t size = vu_read_msg(&rd, &m, &err);
        if (size == 0) break; /* client disconnected */
        if (size < 0) fail("receive", err);
        handled++;
        uint32_t flags = vu_get32(m + 8);
        uint16_t cmd = vu_get16(m + 2);
        if ((flags & VU_FLAG_TYPE_MASK) != VU_FLAG_TYPE_COMMAND)
            fail("protocol error", "received a message that is not a command");
        int no_reply = (flags & VU_FLAG_NO_REPLY) != 0;

        if (__builtin_expect(cmd == VU_CMD_REGION_READ && versioned, 1)) {
            uint32_t count = vu_get32(m + 28);
            if (size != 32 || count > VU_MAX_DATA_XFER || vu_get32(m + 24) >= NUM_REGIONS) {
                if (!no_reply) reply_error(fd, m, EINVAL);
                continue;
            }
            if (no_reply) continue;
            vu_put_hdr(read_reply, vu_get16(m), VU_CMD_REGION_READ, 32 + count, VU_FLAG_TYPE_REPLY, 0);
            memcpy(read_reply + 16, m + 16, 16); /* offset, region, count */
            reply(fd, read_reply, 32 + (size_t)count);
            continue;
        }

        if (!versioned) {
            /* The first message must be VERSION with major 0; otherwise EINVAL and close. */
            if (cmd != VU_CMD_VERSION || size < 20 || vu_get16(m + 16) != 0) {
                reply_error(fd, m, EINVAL);
                fail("protocol error", "first message is not a valid VERSION");
            }
            uint8_t r[16 + 4 + sizeof VERSION_JSON];
            size_t len = sizeof r;
            if (len > (size_t)size) len = (size_t)size >= 23 ? 23 : 20; /* "{}" + NUL, or bare */
            vu_put_hdr(r, vu_get16(m), VU_CMD_VERSION, (uint32_t)len, VU_FLAG_TYPE_REPLY, 0);
            vu_put16(r + 16, 0);
            vu_put16(r + 18, 0);
            if (len == sizeof r) memcpy(r + 20, VERSION_JSON, sizeof VERSION_JSON);
            else if (len == 23) memcpy(r + 20, "{}", 3);
            reply(fd, r, len);
            versioned = 1;
            continue;
        }

        if (cmd == VU_CMD_DEVICE_GET_INFO && size >= 32 && vu_get32(m + 16) >= 16) {
            if (no_reply) continue;
            uint8_t r[32];
            vu_put_hdr(r, vu_get16(m), cmd, 32, VU_FLAG_TYPE_REPLY, 0);
            vu_put32(r + 16, 16);
            vu_put32(r + 20, DEV_FLAGS);
            vu_put32(r + 24, NUM_REGIONS);
            vu_put32(r + 28, NUM_IRQS);
            reply(fd, r, sizeof r);
            continue;
        }

        /* Fixed answers to the bring-up queries, so any client (not only vu_client) can attach. */
        if (cmd == VU_CMD_DEVICE_GET_REGION_INFO && size == 48 && vu_get32(m + 16) >= 32 &&
            vu_get32(m + 24) < NUM_REGIONS) {
            if (no_reply) continue;
            uint32_t index = vu_get32(m + 24);
            uint8_t r[48] = {0};
            vu_put_hdr(r, vu_get16(m), cmd, 48, VU_FLAG_TYPE_REPLY, 0);
            vu_put32(r + 16, 32);
            vu_put32(r + 20, index == 7 ? 0x3u : 0u); /* READ|WRITE for config space */
            vu_put32(r + 24, index);
            vu_put32(r + 32, index == 7 ? 256u : 0u);  /* size (low half of the u64) */
            reply(fd, r, sizeof r);
            continue;
        }
        if (cmd == VU_CMD_DEVICE_GET_IRQ_INFO && size == 32 && vu_get32(m + 16) >= 16 &&
            vu_get32(m + 24) < NUM_IRQS) {
            if (no_reply) continue;
            uint8_t r[32] = {0};
            vu_put_hdr(r, vu_get16(m), cmd, 32, VU_FLAG_TYPE_REPLY, 0);
            vu_put32(r + 16, 16);
            vu_put32(r + 24, vu_get32(m + 24)); /* index; flags 0, count 0 */
            reply(fd, r, sizeof r);
            continue;
        }
        if (cmd == VU_CMD_REGION_WRITE && size >= 32 && (uint64_t)size == 32u + vu_get32(m + 28)) {
            if (no_reply) continue;
            uint8_t r[32];
            vu_put_hdr(r, vu_get16(m), cmd, 32, VU_FLAG_TYPE_REPLY, 0);
            memcpy(r + 16, m + 16, 16);
            reply(fd, r, sizeof r);
            continue;
        }

        if (!no_reply) reply_error(fd, m, EINVAL);
    }

    if (verbose) fprintf(stderr, "vu_echo: client disconnected after %llu messages\n",
                         (unsigned long long)handled);
    close(fd);
    unlink(sock_path);
    return 0;
}
