// Command coredns is CoreDNS with only the plugins a lab cluster's DNS uses (the Corefile in
// tests/e2e/coredns.yaml) and the e2e DNS tests' own server (agnhost's /coredns: hosts, log):
// no cloud backends, no forwarding (the lab has no upstream DNS).
// The directive list keeps upstream's plugin.cfg order.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/hosts"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
	_ "github.com/coredns/coredns/plugin/template"
)

func init() {
	dnsserver.Directives = []string{
		"reload", "ready", "health", "errors", "log", "loadbalance", "cache", "template", "hosts", "kubernetes",
	}
}

func main() {
	coremain.Run()
}
