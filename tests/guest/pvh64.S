/* ELF64 kernel with a PVH entry note: entered in 32-bit protected mode with EBX = hvm_start_info,
 * it checks the start_info magic, builds identity page tables, switches to 64-bit long mode,
 * prints from 64-bit code and leaves through debug-exit with status 2*0x12+1 = 37. */
#include "boot_common.inc"
	.section .note.Xen, "a"
	.align 4
	.long 4                        /* namesz */
	.long 4                        /* descsz */
	.long 18                       /* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.long pvh_start

	.text
	.code32
	.globl pvh_start
pvh_start:
	movl $0x90000, %esp
	cmpl $0x336ec578, (%ebx)
	jne fail32
	/* PML4[0] -> PDPT, PDPT[0] -> PD, PD[0] = 2 MiB page at 0 */
	movl $pml4, %edi
	movl $pdpt, %eax
	orl $3, %eax
	movl %eax, (%edi)
	movl $pdpt, %edi
	movl $pd, %eax
	orl $3, %eax
	movl %eax, (%edi)
	movl $pd, %edi
	movl $0x83, (%edi)
	movl $pml4, %eax
	movl %eax, %cr3
	movl %cr4, %eax
	orl $0x20, %eax                /* PAE */
	movl %eax, %cr4
	movl $0xC0000080, %ecx         /* EFER.LME */
	rdmsr
	orl $0x100, %eax
	wrmsr
	movl %cr0, %eax
	orl $0x80000001, %eax          /* PG | PE */
	movl %eax, %cr0
	lgdt gdt_ptr
	ljmp $0x08, $long64
fail32:
	movl $oops, %esi
	PUTS
	DEBUG_EXIT 0x7f
	hlt

	.code64
long64:
	movq $msg, %rsi
	PUTS
	DEBUG_EXIT 0x12
	hlt

	.section .rodata
	.align 8
gdt:	.quad 0
	.quad 0x00209A0000000000       /* 64-bit code */
gdt_ptr:
	.word gdt_ptr - gdt - 1
	.long gdt
msg:	.asciz "PVH64 long mode ok\n"
oops:	.asciz "PVH64 bad start_info\n"

	.bss
	.align 4096
pml4:	.space 4096
pdpt:	.space 4096
pd:	.space 4096
