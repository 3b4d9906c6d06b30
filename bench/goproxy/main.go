// goproxy is the benchmark's stand-in for the original Go Aegis: GET /NAME is answered by
// SOCKDIR/NAME.sock, path /metrics, through a fresh httputil.ReverseProxy and a fresh
// Transport per request, so every scrape dials the Unix socket anew (no keep-alive), as the
// original did. Standard library only: it builds offline with Debian's golang-go.
package main

import (
	"context"
	"flag"
	"log"
	"net"
	"net/http"
	"net/http/httputil"
	"os"
	"path"
	"path/filepath"
)

func main() {
	listen := flag.String("hostport", "127.0.0.1:31337", "TCP address to serve on")
	dir := flag.String("sockdir", "./run", "directory of the upstreams' Unix sockets")
	flag.Parse()

	handler := func(w http.ResponseWriter, r *http.Request) {
		sock := filepath.Join(*dir, path.Base(r.URL.Path)+".sock")
		if _, err := os.Stat(sock); err != nil {
			http.NotFound(w, r)
			return
		}
		transport := &http.Transport{
			DisableKeepAlives: true,
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", sock)
			},
		}
		proxy := &httputil.ReverseProxy{
			Transport: transport,
			Director: func(out *http.Request) {
				out.URL.Scheme = "http"
				out.URL.Host = "upstream"
				out.URL.Path, out.URL.RawPath = "/metrics", ""
			},
		}
		proxy.ServeHTTP(w, r)
	}
	log.Printf("%s -> %s", *listen, *dir)
	log.Fatal(http.ListenAndServe(*listen, http.HandlerFunc(handler)))
}
