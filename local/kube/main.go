// loco-kube: the real Kubernetes control plane that `loco local up --control-plane kubernetes` starts,
// linked once into one multi-call binary (one link instead of four saves minutes and a gigabyte).
//
//	loco-kube etcd [flags]                     etcd (go.etcd.io/etcd/server/v3)
//	loco-kube kube-apiserver [flags]           k8s.io/kubernetes/cmd/kube-apiserver
//	loco-kube kube-controller-manager [flags]  k8s.io/kubernetes/cmd/kube-controller-manager
//	loco-kube kube-scheduler [flags]           k8s.io/kubernetes/cmd/kube-scheduler
//	loco-kube version                          the versions linked in
//
// Called through a link named after a component, it runs that component.
package main

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime/debug"
	_ "time/tzdata" // CronJob time zones, as the upstream binaries do

	"github.com/spf13/cobra"
	"go.etcd.io/etcd/server/v3/etcdmain"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // --logging-format=json
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics, as upstream
	_ "k8s.io/component-base/metrics/prometheus/version"  // the build-info metric, as upstream
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
)

var components = map[string]func() *cobra.Command{
	"kube-apiserver":          apiserver.NewAPIServerCommand,
	"kube-controller-manager": controllermanager.NewControllerManagerCommand,
	"kube-scheduler":          func() *cobra.Command { return scheduler.NewSchedulerCommand() },
}

func main() {
	name, args := filepath.Base(os.Args[0]), os.Args[1:]
	if _, ok := components[name]; !ok && name != "etcd" {
		if len(args) == 0 {
			usage()
		}
		name, args = args[0], args[1:]
	}
	switch name {
	case "etcd":
		// etcdmain reads its flags from os.Args itself.
		etcdmain.Main(append([]string{"etcd"}, args...))
	case "version":
		printVersions()
	default:
		newCommand, ok := components[name]
		if !ok {
			usage()
		}
		command := newCommand()
		command.SetArgs(args)
		os.Exit(cli.Run(command))
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: loco-kube etcd|kube-apiserver|kube-controller-manager|kube-scheduler|version [flags]")
	os.Exit(2)
}

// printVersions prints the module versions this binary was built from, so a test can check the pin.
func printVersions() {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		fmt.Println("no build info")
		return
	}
	for _, dep := range info.Deps {
		switch dep.Path {
		case "k8s.io/kubernetes", "go.etcd.io/etcd/server/v3", "k8s.io/apiserver", "k8s.io/client-go":
			version := dep.Version
			if dep.Replace != nil {
				version = dep.Replace.Version
			}
			fmt.Printf("%s %s\n", dep.Path, version)
		}
	}
	fmt.Println("go", info.GoVersion)
}
