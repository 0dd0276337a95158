#!/bin/sh
# Writes the seed corpus into fuzz/corpus/<target>/ (not in git: made anew
# by this script). The seeds come from the tests: commands of
# src/smtp/command.rs, backend replies of src/smtp/reply.rs and
# tests/faults.rs, messages with the smuggling vectors of tests/faults.rs
# and src/smtp/data.rs, BDAT content of src/smtp/bdat.rs and
# tests/bdat.rs, PROXY v1/v2 headers of src/proxy_protocol.rs and
# tests/proxy_protocol.rs, and the configs in config/.
#
# Layout of an input (see each target): data, bdat and session start with
# a flags byte; reply, data, bdat, proxy and session take two bytes of
# seed for the cuts before the bytes themselves.
set -eu
cd "$(dirname "$0")"
C=corpus
rm -rf "$C"
mkdir -p "$C/command" "$C/reply" "$C/data" "$C/bdat" "$C/proxy" "$C/config" "$C/session"
n=0
seed() { # seed TARGET PREFIX BYTES(printf format)
    n=$((n + 1))
    { printf "$2"; printf "$3"; } > "$C/$1/seed-$n"
}

for c in 'EHLO client.example' 'HELO [192.0.2.1]' 'ehlo  x' \
    'MAIL FROM:<a@example.com>' 'MAIL FROM:<> SIZE=100 BODY=8BITMIME' \
    'MAIL FROM: <"quoted string"@example.com> SMTPUTF8' \
    'MAIL FROM:<@a.example,@b.example:john.@example.com>' \
    'MAIL FROM:<a@[IPv6:2001:db8::1]> BODY=7BIT SIZE=99999999999999999999' \
    'RCPT TO:<Postmaster>' 'RCPT TO:<b@[192.0.2.1]>' 'RCPT TO:<\303\251@\303\251.example>' \
    'DATA' 'RSET' 'NOOP x' 'QUIT' 'VRFY x' 'HELP' 'STARTTLS' 'BDAT 10 LAST' 'MAIL FROM:<a@b>\r'; do
    seed command '' "$c"
done

for r in '250 2.1.0 Ok\r\n' '220 mx ESMTP\r\n' \
    '250-mx\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250 8BITMIME\r\n' \
    '354 End data with <CR><LF>.<CR><LF>\r\n' \
    '550-5.1.1 one\n550-5.1.1 two\r\n550 5.1.1 three\r\n' \
    '451 4.3.0 Error: queue file write error\r\n250 2.0.0 Ok\r\n' \
    '250 2.000.01 odd code\r\n250\r\n' '421 4.4.2 mx Error: timeout exceeded\r\n' \
    '250-2.0.0 a\r\n250 b\r\n' '25' '250-x\r\n251 y\r\n'; do
    seed reply '\001\002' "$r"
done

body='Subject: x\r\n\r\nbody\r\n..stuffed\r\n.\r\nQUIT\r\n'
for f in '\000' '\001' '\002' '\003' '\011'; do
    seed data "$f\003\005" "$body"
    seed data "$f\007\001" '.\r\n'
    for v in '\n.\n' '\r.\r' '\r\n.\n' '\n.\r\n' '\r.\r\n' '\r\n.\r\r\n' '.\n' '.\rx'; do
        seed data "$f\011\042" "Subject: smuggling test\r\n\r\nHello${v}MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\n\r\nevil body\r\n.\r\n"
    done
done

# bdat: flags (bit 0: normalize; flags >> 1 mod 6: max_line; bits 6, 7:
# LAST in the bdat_command round trips), cut seed, content (its first line
# is also parsed as BDAT arguments).
for f in '\000' '\001' '\002' '\003' '\011' '\301'; do
    seed bdat "$f\003\005" 'Subject: bdat tricky\r\n\r\nfirst\r\n.dot line\r\n.\r\nMAIL FROM:<evil@smuggler.example>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n\r\n.\r\n..two dots\r\nlast line without CRLF'
    seed bdat "$f\001\000" '4096 LAST\r\n'
    seed bdat "$f\007\001" '.'
    for v in 'a\n.\nMAIL FROM:<x>\n' 'a\r.\rMAIL FROM:<x>\r\n' 'a\r\n.\n' 'a\n.\r\n' \
        '.\r\r\n' 'a\r\n.' 'a\r\nb\r' 'abcd\r\nabcde\r\n' 'abcd\nabcd\rabcd'; do
        seed bdat "$f\011\042" "$v"
    done
done

v2() { # v2 CMD FAM LEN ADDR
    seed proxy '\005\001' "\r\n\r\n\000\r\nQUIT\n$1$2$3$4"
}
seed proxy '\001\000' 'PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\nEHLO x\r\n'
seed proxy '\002\000' 'PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n'
seed proxy '\003\000' 'PROXY UNKNOWN\r\n'
seed proxy '\004\000' 'PROXY TCP4 1.2.3.4 nonsense 1 2\r\n'
v2 '\041' '\021' '\000\014' '\300\000\002\007\306\063\144\001\234\100\000\031'
v2 '\041' '\041' '\000\044' '\040\001\015\270\000\000\000\000\000\000\000\000\000\000\000\001\040\001\015\270\000\000\000\000\000\000\000\000\000\000\000\002\000\001\000\031'
v2 '\040' '\000' '\000\000' ''
v2 '\041' '\021' '\000\021' '\300\000\002\007\306\063\144\001\234\100\000\031\004\000\002ab'

for f in ../config/*.toml; do
    n=$((n + 1))
    cp "$f" "$C/config/seed-$n"
done
seed config '' 'hostname = "h"\n[[listener]]\naddress = "127.0.0.1:2525"\n[[backend]]\naddress = "127.0.0.1:25"\nmax_idle = 60\n'

S='EHLO client.example\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n'
for f in '\000' '\001'; do
    seed session "$f\000\000" "${S}Subject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n"
    seed session "$f\005\002" "${S}Subject: smuggle\r\n\r\nx\n.\nMAIL FROM:<e@x>\r\n.\r\nRSET\r\n${S}two\r\n.\r\n"
    seed session "$f\000\000" 'HELO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\nNOOP\r\nRSET\r\nVRFY x\r\nHELP\r\nQUIT\r\n'
    seed session "$f\000\000" 'EHLO client.example\r\nSTARTTLS\r\n\026\003\001\000\005hello'
    seed session "$f\000\000" 'DATA\r\nRCPT TO:<a@b>\r\nMAIL FROM:<a@b> SIZE=999999\r\nEHLO [127.0.0.1]\r\n'
done
echo "seeds: $(find "$C" -type f | wc -l) files in $C/"
